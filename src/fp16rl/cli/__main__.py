"""``python -m fp16rl.cli`` = ``fp16rl``."""

from fp16rl.cli import main

main()
