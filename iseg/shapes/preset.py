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
    lam=0.0,
    iterations=5,
    bg_power=0.35,
    batch_size=32,
)

# Thresholds of iseg.labels' "attention" method for this model, chosen on 500 validation images
# (python -m iseg.labels --split val): label F1 0.971 there. The model card has the test figures.
LABEL_THRESHOLDS = dict(min_share=0.0146, min_peak=0.025, min_labels=1)
