"""Paper scale: eight MedMNIST datasets as eight hospitals (Radwan, Osman, Shehata,
arXiv 2407.14719, federate 8 datasets of different body parts and modalities),
through the same federation as configs/federated_demo.py.

Prepare each dataset once (the official .npz files, downloaded by you from Zenodo
record 10519652; 64-px MedMNIST+ files here) into ROOT/NAME_64:
    for d in pathmnist chestmnist dermamnist octmnist pneumoniamnist bloodmnist \
             tissuemnist organamnist; do
      python tools/prepare_data.py --builder medmnist_$d --input ~/medmnist/${d}_64.npz \
          --output /data/medmnist/${d}_64 --size native
    done
Command (`pip install -e ".[federated]"`):
    python main.py --config configs/federated_medmnist.py:/data/medmnist \
        --workdir workdirs/fed_medmnist
and its leave-one-site-out experiment:
    python main.py --config configs/experiments/federated_loso.py:medmnist=/data/medmnist \
        --workdir workdirs/loso_medmnist

Every site fine-tunes a ViT-S/8 encoder at 64 px with its own head on its official
train split (softmax cross-entropy; ChestMNIST's 14 labels multi-label BCE;
RetinaMNIST, whose ordinal grades make an odd site, is left out, as are OrganC/S,
which repeat OrganA's CT volumes). The server's label-free step distils on the
embedded unlabelled phantom pool, or on a pool of your own
(`--config.server.distill.data.pool=...`, input_pipeline.unlabelled). Sites differ by
their data alone here: no simulated scanner.

Expected wall time: GPU-scale (8 sites x 20 rounds x 200 local steps of batch 128);
not measured on the 2-core CPU. Expected result: not measured here; the paper
reports the universal model ahead of an MIM baseline pretrained on pooled data, with
statistical significance.
"""

from configs import federated_demo
from configs.finetune_base import finetune_defaults
from input_pipeline.builders.medmnist import DATASETS, MULTI_LABEL

SITES = ("pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist", "bloodmnist",
         "tissuemnist", "organamnist")
SIZE = 64


def _site(fed, name: str, root: str):
    info = DATASETS[name]
    multilabel = info.task == MULTI_LABEL
    c = finetune_defaults(label="label", class_names=info.classes, multilabel=multilabel,
                          label_smoothing=0.0 if multilabel else 0.1)
    m = c.model
    m.variant, m.width, m.depth, m.num_heads, m.mlp_dim = "S/8", 384, 12, 6, 1536
    m.image_size, m.channels, m.drop_path_rate = SIZE, 1, 0.1
    c.data.source, c.data.dir = "prepared", f"{root}/{name}_{SIZE}"
    c.data.roi_context = 0.0
    c.data.crop_scale = (0.8, 1.0)
    c.data.norm_mean, c.data.norm_std = 0.5, 0.25  # MedMNIST luma, roughly; measure per site
    c.data.num_workers = 4
    c.global_batch_size = 128
    c.total_steps = fed.get_ref("rounds") * fed.get_ref("local_steps")
    c.warmup_steps = 100
    c.optimizer.base_lr = 5e-4 * 256 / 128
    c.optimizer.layer_decay = None
    c.eval_every = 0
    c.checkpoint_every = 100000  # fit() saves at the end of every round
    return c


def get_config(arg=None):
    root = arg or "data/medmnist"
    c = federated_demo.get_config()
    c.federated.rounds, c.federated.local_steps = 20, 200
    c.sites = {name: _site(c.federated, name, root) for name in SITES}
    c.federated.min_sites = len(SITES)
    c.server = federated_demo.server_defaults(c.federated, SITES, SIZE, pool_images=2048)
    m = c.server.distill.model
    m.variant, m.width, m.depth, m.num_heads, m.mlp_dim = "S/8", 384, 12, 6, 1536
    c.server.distill.global_batch_size = 128
    c.server.distill.data.num_workers = 4
    return c
