"""The one place pgctx imports psycopg2, so a missing driver fails with advice.

pgctx does not depend on a particular psycopg2 distribution (the source build
``psycopg2`` or the ``psycopg2-binary`` wheel); the user picks one through an
extra, as SQLAlchemy does for its drivers.
"""

from __future__ import annotations

try:
    import psycopg2
    import psycopg2.extensions as extensions
    import psycopg2.pool as psycopg2_pool
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "pgctx needs psycopg2, which is not installed: install it with "
        "`pip install 'pgctx[binary]'` (the psycopg2-binary wheel) or "
        "`pip install 'pgctx[psycopg2]'` (psycopg2 built from source)"
    ) from exc

__all__ = ["extensions", "psycopg2", "psycopg2_pool"]
