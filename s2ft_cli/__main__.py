"""``python -m s2ft_cli`` (e.g. ``torchrun --nproc_per_node 2 -m s2ft_cli train r.yaml``)."""

from .cli import main

main()
