"""`python -m moe_infinity`: the `moe-infinity` command, for machines where the console script
is not installed (the package on PYTHONPATH only)."""

from moe_infinity.cli import app

if __name__ == "__main__":
    app(prog_name="moe-infinity")
