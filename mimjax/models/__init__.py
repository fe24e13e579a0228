"""Model registry: `config.model.name` -> builder(model_cfg, rngs=...)."""

from flax import nnx

from mimjax.models import classifier, distiller, heatmap, mae, mcr, segmenter

_BUILDERS = {"mae": mae.build_mae, "vit_classifier": classifier.build_classifier,
             "mcr": mcr.build_mcr, "segmenter": segmenter.build_segmenter,
             "heatmap": heatmap.build_heatmap_model,
             "universal_distiller": distiller.build_distiller}


def build_model(model_cfg, *, rngs: nnx.Rngs) -> nnx.Module:
    if model_cfg.name not in _BUILDERS:
        raise ValueError(f"Unknown model.name {model_cfg.name!r}; known: {sorted(_BUILDERS)}.")
    return _BUILDERS[model_cfg.name](model_cfg, rngs=rngs)
