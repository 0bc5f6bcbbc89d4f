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
    iterations=10,
    bg_power=0.35,
    batch_size=32,
)
