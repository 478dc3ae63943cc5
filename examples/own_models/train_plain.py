"""The second checkpoint, from a plain ``Trainer`` + ``ModelCheckpoint`` (no class path recorded):
``ckpts/b.ckpt``, trained on Fashion-MNIST classes 5-9 (local labels 0-4)."""

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from my_project.data import FashionTaskData
from my_project.models import UserNet

if __name__ == "__main__":
    pl.seed_everything(1)
    checkpoint = ModelCheckpoint(dirpath="ckpts", filename="b", enable_version_counter=False)
    trainer = pl.Trainer(max_steps=100, logger=False, accelerator="cpu", callbacks=[checkpoint])
    trainer.fit(UserNet(), datamodule=FashionTaskData(classes=[5, 6, 7, 8, 9]))
