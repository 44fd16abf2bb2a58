"""``python -m fp16rl`` = ``fp16rl`` (what ``torchrun -m fp16rl train ...`` runs on every rank)."""

from fp16rl.cli import main

main()
