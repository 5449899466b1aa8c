"""Importing pgctx without psycopg2 fails with advice naming the extras."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_import_without_psycopg2_names_the_extra() -> None:
    script = textwrap.dedent(
        """
        import sys

        class NoPsycopg2:
            def find_spec(self, name, path=None, target=None):
                if name == "psycopg2" or name.startswith("psycopg2."):
                    raise ImportError(f"No module named {name!r}")
                return None

        sys.meta_path.insert(0, NoPsycopg2())
        try:
            import pgctx
        except ImportError as exc:
            print(exc)
        else:
            print("imported")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert "pgctx[binary]" in result.stdout
    assert "pgctx[psycopg2]" in result.stdout
