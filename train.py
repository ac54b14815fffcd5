"""Train a character-level language model.

python train.py                                  # nano preset on the bundled sample
python train.py model=small data.path=my.txt     # any config key can be overridden
python train.py -m model=nano,small,medium       # a sweep, one run per preset
"""

import hydra
from omegaconf import DictConfig

from nanollm.cli import exit_on_user_error, run_entry_point, train_command


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> float | None:
    return train_command(cfg)


if __name__ == "__main__":
    run_entry_point(main)
