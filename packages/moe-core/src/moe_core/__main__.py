"""`python -m moe_core`: the `moe-core` command, for machines where the console script is not
installed (the package on PYTHONPATH only)."""

from moe_core.cli import app

if __name__ == "__main__":
    app(prog_name="moe-core")
