"""ckpt_hooks.patches.mindformers with MindFormers' own trainer utilities: its checkpoint
dispatcher, as the trainers import it, loads through ckpt_hooks when ``auto_trans_ckpt`` is
set, and is MindFormers' own again after uninstall.

MindFormers is not installed by ``./run.sh`` (its releases for MindSpore 2.10 pin other
versions of transformers, pyarrow and nltk, and 2.x needs ``hyper-parallel``, which is not on
PyPI): the test runs where ``import mindformers`` works, e.g. in a venv with MindSpore 2.10.0
and ``pip install --no-deps mindformers==1.9.0`` plus its listed requirements."""

import numpy as np
import pytest

pytest.importorskip("mindspore")
mindformers = pytest.importorskip("mindformers")

import mindspore as ms  # noqa: E402
from mindformers.tools.register import MindFormerConfig  # noqa: E402
from mindspore import nn  # noqa: E402
from mindspore.train import CheckpointConfig, Model, ModelCheckpoint  # noqa: E402

from ckpt_hooks.mindspore.callback import CheckpointManifest  # noqa: E402
from ckpt_hooks.patches import mindformers as patch  # noqa: E402
from tests.harness.mindspore_run import STEPS, dataset, network_and_optimizer  # noqa: E402


def parameters(*cells):
    return {p.name: p.asnumpy().copy() for cell in cells for p in cell.get_parameters()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A stand-alone run's checkpoint (one epoch) and its network and optimizer state."""
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    directory = tmp_path_factory.mktemp("mindformers") / "ckpt"
    net, opt = network_and_optimizer()
    checkpoint = ModelCheckpoint(prefix="CKP", directory=str(directory),
                                 config=CheckpointConfig(save_checkpoint_steps=STEPS, keep_checkpoint_max=1))
    Model(net, loss_fn=nn.MSELoss(), optimizer=opt).train(1, dataset(0, 1), callbacks=[checkpoint, CheckpointManifest()],
                                                          dataset_sink_mode=False)
    return directory, parameters(net, opt)


def config(load_path, auto_trans_ckpt=True):
    return MindFormerConfig(auto_trans_ckpt=auto_trans_ckpt, only_save_strategy=False, load_ckpt_format="ckpt",
                            checkpoint={"load_path": str(load_path)}, load_checkpoint=str(load_path),
                            model={"model_config": {}}, runner_config={"step_scale": None})


def test_auto_trans_ckpt_loads_through_ckpt_hooks(saved, capsys):
    from mindformers.trainer import base_trainer, utils

    directory, truth = saved
    net, opt = network_and_optimizer(hidden=16)
    assert any(not np.array_equal(v, truth[k]) for k, v in parameters(net, opt).items())
    original = utils.transform_and_load_checkpoint
    patch.install()
    try:
        assert base_trainer.transform_and_load_checkpoint is patch.transform_and_load_checkpoint
        base_trainer.transform_and_load_checkpoint(config(directory), None, net, None, optimizer=opt)
    finally:
        patch.uninstall()
    assert base_trainer.transform_and_load_checkpoint is original is utils.transform_and_load_checkpoint
    assert "ckpt_hooks: loaded" in capsys.readouterr().out
    loaded = parameters(net, opt)
    assert {k: v.tobytes() for k, v in loaded.items()} == {k: v.tobytes() for k, v in truth.items()}


def test_without_auto_trans_ckpt_mindformers_loads_itself(saved, capsys):
    from mindformers.trainer import base_trainer

    directory, truth = saved
    checkpoint = next(directory.glob("*.ckpt"))
    net, opt = network_and_optimizer(hidden=16)
    patch.install()
    try:
        base_trainer.transform_and_load_checkpoint(config(checkpoint, auto_trans_ckpt=False), None, net, None,
                                                   optimizer=opt)
    finally:
        patch.uninstall()
    assert "ckpt_hooks: loaded" not in capsys.readouterr().out
    assert all(v.tobytes() == truth[k].tobytes() for k, v in parameters(net).items())
