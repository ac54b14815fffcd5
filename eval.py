"""Score text with a checkpoint alone: loss, perplexity and bits per character.

python eval.py ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt data.path=data/raw/sample.txt
python eval.py ckpt_path=outputs/multirun/<date>/<time> data.path=heldout.txt output=scores.json
"""

import hydra
from omegaconf import DictConfig

from nanollm.cli import eval_command, exit_on_user_error, run_entry_point


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@exit_on_user_error(
    interrupted="evaluation interrupted; nothing was written.", out_of_memory="use a smaller eval.batch_size"
)
def main(cfg: DictConfig) -> None:
    eval_command(cfg)


if __name__ == "__main__":
    run_entry_point(main)
