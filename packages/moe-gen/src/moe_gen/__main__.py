"""`python -m moe_gen`: the `moe-gen` command, for machines where the console script is not
installed (the package on PYTHONPATH only)."""

from moe_gen.cli import app

if __name__ == "__main__":
    app(prog_name="moe-gen")
