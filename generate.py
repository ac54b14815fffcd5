"""Sample text from a checkpoint alone.

python generate.py ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt prompt="The quick"
python generate.py ckpt_path=last temperature=0.5 top_k=1 max_new_tokens=300
"""

import hydra
from omegaconf import DictConfig

from nanollm.cli import exit_on_user_error, generate_command, run_entry_point


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
@exit_on_user_error(interrupted="generation interrupted.", out_of_memory="use a smaller num_samples or max_new_tokens")
def main(cfg: DictConfig) -> None:
    generate_command(cfg)


if __name__ == "__main__":
    run_entry_point(main)
