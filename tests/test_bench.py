"""The benchmark must not rot: it runs on the shapes model with tiny settings."""

import json

from iseg.bench import main


def test_bench_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["--model", "shapes", "--batch-sizes", "1", "2", "--repeats", "1", "--out", str(out),
                 "--offload-text-encoder"]) == 0
    text = capsys.readouterr().out
    assert "segment / (VAE + UNet)" in text and text.count("\n| ") >= 3
    report = json.loads(out.read_text())
    assert [r["batch"] for r in report["rows"]] == [1, 2]
    assert {(r["variant"], r["text_encoder"]) for r in report["rows"]} == {("none", "cpu")}
    for row in report["rows"]:
        for key in ("vae_encode_ms", "unet_sdpa_ms", "segment_ms", "refine_ms", "ratio", "peak_memory_mb"):
            assert row[key] > 0
