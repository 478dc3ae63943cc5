"""The user's own LightningCLI (``python -m my_project.cli fit ...``): it stores the model's class path in
every checkpoint (``hyper_parameters._class_path``), which is how lightning_merge finds ``UserNet``."""

from lightning.pytorch.cli import LightningCLI

if __name__ == "__main__":
    LightningCLI(subclass_mode_model=True, subclass_mode_data=True)
