"""``python -m Uni_MoE.train``: see Uni_MoE.train.train."""

from .train import main

main()
