"""`python -m mergekit_recycle.demo_pool DIR [--seed S] [--size small|default]`."""

from mergekit_recycle.cli import cli

if __name__ == "__main__":
    cli(["demo-pool", *__import__("sys").argv[1:]], prog_name="python -m mergekit_recycle.demo_pool")
