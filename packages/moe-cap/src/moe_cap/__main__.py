"""`python -m moe_cap`: the `moe-cap` command, for machines where the console script is not
installed (the package on PYTHONPATH only)."""

from moe_cap.cli import app

if __name__ == "__main__":
    app(prog_name="moe-cap")
