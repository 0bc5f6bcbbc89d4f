"""The shapes model's own iSeg settings, chosen on the validation split (see its model card)."""

SHAPES_PRESET = dict(
    prompt_prefix="a",
    prompt_joiner=" and a ",
    extra_words=(),
    background_words=(),
    cross_weights={16: 0.3, 8: 0.7},
    clustering=False,
    gamma=1.6,
    timestep=100,
    lam=100.0,
    iterations=5,
    bg_power=0.2,
    batch_size=32,
)

# Thresholds of iseg.labels' "attention" method for this model, chosen on 500 validation images for
# the best open-vocabulary mIoU with the preset above (python -m iseg.labels --split val --objective
# miou): 88.79 there, label F1 0.982. The model card has the test figures.
LABEL_THRESHOLDS = dict(min_share=0.0, min_peak=0.175, min_labels=1)
