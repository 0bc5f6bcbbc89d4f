"""The benchmark must not rot: it runs on the shapes model with tiny settings."""

import json

from iseg.commands.main import main


def test_bench_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "shapes", "--batch-sizes", "1", "2", "--repeats", "1", "--out", str(out),
                 "--offload-text-encoder"]) == 0
    text = capsys.readouterr().out
    assert "segment / (VAE + UNet)" in text and text.count("\n| ") >= 3
    report = json.loads(out.read_text())
    assert [r["batch"] for r in report["rows"]] == [1, 2]
    assert {(r["variant"], r["text_encoder"]) for r in report["rows"]} == {("none", "cpu")}
    for row in report["rows"]:
        for key in ("vae_encode_ms", "unet_sdpa_ms", "segment_ms", "refine_ms", "ratio", "peak_memory_mb"):
            assert row[key] > 0


def test_full_size_architectures_have_the_published_parameter_counts():
    # built on the meta device (no memory, no time): the configs are SDXL-base's and SD3-medium's,
    # declared by their backbones; bench's --model names come from the backbone registry
    import torch

    from iseg.backbones import SD3Backbone, SDXLBackbone, UNetBackbone
    from iseg.commands import bench
    from iseg.shapes.model import make_tokenizer

    tokenizer = make_tokenizer(max_length=77)
    with torch.device("meta"):
        sdxl, sd3 = SDXLBackbone.full_size_components(tokenizer), SD3Backbone.full_size_components(tokenizer)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(sdxl["unet"]) == 2_567_463_684
    assert count(sd3["transformer"]) == 2_028_328_000
    assert sdxl["text_encoder_2"].config.projection_dim == 1280 and sd3["text_encoder_3"] is None
    assert bench.ARCHITECTURES == {"sd21-arch": UNetBackbone, "sdxl-arch": SDXLBackbone, "sd3-arch": SD3Backbone}
    assert UNetBackbone.architecture.preset == "wsss-voc"
