"""Text to image: tokenizers and encoders (sde_diffusion/text/), cross-attention (models/layers.py, unet.py),
captioned data (data/digit_pairs.py, data/folder.py), caption dropout and checkpoints (tasks/score_matching.py),
prompts at sampling time (jobs/sample_job.py, guidance.ContextGuidance)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sde_diffusion.data.digit_pairs import (HELD_OUT_PAIRS, DigitPairsDataModule, all_captions, halves, paraphrases,
                                            training_pairs)
from sde_diffusion.models import build_model
from sde_diffusion.text import ByteTokenizer, TinyTextEncoder, WordTokenizer, tokenizer_from_state

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SMALL_UNET = dict(ch=16, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4], dropout=0.0)


# ----------------------------------------------------------------------------- tokenizers
def test_word_tokenizer_round_trips_and_names_unknown_words():
    tok = WordTokenizer.from_captions(["3 left of 8", "an eight to the right of a three"], max_length=8)
    ids, mask = tok.encode(["3 left of 8", ""])
    assert ids.shape == (2, 8) and mask[0].sum() == 5 and mask[1].sum() == 1    # <bos> + 4 words; "" is <bos>
    assert tok.vocab[ids[0, 1]] == "3" and tok.vocab[ids[0, 4]] == "8" and not mask[0, 5:].any()
    again = tokenizer_from_state(json.loads(json.dumps(tok.state())))
    torch.testing.assert_close(again.encode(["3 left of 8"])[0], ids[:1])
    with pytest.raises(ValueError, match="never saw in training: above, beside"):
        tok.encode(["3 beside 8 above"])
    unk = WordTokenizer(tok.vocab, 8, unknown="unk")
    assert unk.encode(["3 above 8"])[0][0, 2] == unk.index["<unk>"]
    with pytest.warns(UserWarning, match="cut to fit"):
        ids, mask = tok.encode(["3 left of 8 left of 8 left of 8"])
    assert mask.all() and ids.shape == (1, 8)


def test_byte_tokenizer_reads_any_text():
    tok = ByteTokenizer(max_length=6)
    ids, mask = tok.encode(["ab", "é"])
    assert ids[0, :3].tolist() == [2, ord("a") + 3, ord("b") + 3] and mask.sum(1).tolist() == [3, 3]
    assert tokenizer_from_state(tok.state()).encode(["ab"])[0].tolist() == ids[:1].tolist()


def test_tiny_encoder_ignores_padding_and_is_deterministic():
    torch.manual_seed(0)
    enc = TinyTextEncoder(WordTokenizer.from_captions(all_captions(), 16), dim=32, layers=2, heads=4).eval()
    c1, m1 = enc.encode(["3 left of 8"])
    ids, mask = enc.tokenizer.encode(["3 left of 8"])
    ids2 = ids.clone()
    ids2[~mask] = 7  # other ids at padded positions
    torch.testing.assert_close(enc(ids2, mask), c1)
    assert c1.shape == (1, 16, 32) and (c1[0, ~m1[0]] == 0).all()


# ----------------------------------------------------------------------------- cross-attention
def _pair(context_dim=12, **kw):
    torch.manual_seed(0)
    plain = build_model("unet", (1, 8, 16), zero_init=False, **SMALL_UNET).eval()
    torch.manual_seed(0)
    text = build_model("unet", (1, 8, 16), zero_init=False, context_dim=context_dim, **SMALL_UNET, **kw).eval()
    text.load_state_dict(plain.state_dict(), strict=False)
    return plain, text


@pytest.mark.parametrize("where", ["attn", "all"])
def test_zero_initialised_cross_attention_is_exactly_the_plain_unet(where):
    plain, text = _pair(cross_attention=where)
    x, t = torch.randn(3, 1, 8, 16), torch.rand(3)
    ctx, mask = torch.randn(3, 5, 12), torch.tensor([[1, 1, 0, 0, 0], [1] * 5, [1, 0, 0, 0, 0]]).bool()
    assert torch.equal(plain(x, t), text(x, t, context=ctx, context_mask=mask))
    n_cross = sum(type(m).__name__ == "CrossAttnBlock" for m in text.modules())
    assert n_cross == (3 if where == "attn" else 7)


def test_padding_tokens_never_change_the_output_and_shapes_are_checked():
    _, text = _pair()
    for m in text.modules():
        if type(m).__name__ == "CrossAttnBlock":
            torch.nn.init.normal_(m.proj.weight)
    torch.nn.init.normal_(text.context_embed.weight)
    x, t = torch.randn(2, 1, 8, 16), torch.rand(2)
    ctx, mask = torch.randn(2, 6, 12), torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]]).bool()
    out = text(x, t, context=ctx, context_mask=mask)
    other = ctx.clone()
    other[~mask] = 1e3 * torch.randn(int((~mask).sum()), 12)
    torch.testing.assert_close(text(x, t, context=other, context_mask=mask), out, rtol=0, atol=1e-5)
    assert (out - text(x, t, context=ctx * 0.5, context_mask=mask)).abs().max() > 1e-3   # real tokens matter
    one = text(x[:1], t[:1], context=ctx[:1], context_mask=mask[:1])
    torch.testing.assert_close(text(x[:1].expand(2, -1, -1, -1), t[:1].expand(2), context=ctx[:1], context_mask=mask[:1])[1:],
                               one)   # a batch-1 context is broadcast
    with pytest.raises(ValueError, match=r"context must have shape \[B, L, 12\]"):
        text(x, t, context=torch.randn(2, 6, 5), context_mask=mask)
    with pytest.raises(ValueError, match="pass context"):
        text(x, t)
    plain = build_model("unet", (1, 8, 16), **SMALL_UNET)
    with pytest.raises(ValueError, match="built without text"):
        plain(x, t, context=ctx, context_mask=mask)


# ----------------------------------------------------------------------------- captioned data
def test_digit_pairs_hold_out_pairs_from_every_training_batch_and_captions_say_the_order():
    dm = DigitPairsDataModule(n_train=3000, n_val=400, batch_size=256)
    dm.setup()
    assert dm.data_shape == (1, 8, 16) and len(HELD_OUT_PAIRS) == 10 and len(training_pairs()) == 90
    held = {10 * a + b for a, b in HELD_OUT_PAIRS}
    seen = set()
    for _, y in dm.train_dataloader():
        seen |= set(y.tolist())
    assert not (seen & held) and len(seen) == 90
    # Every digit still appears on both sides in training.
    assert {y // 10 for y in seen} == set(range(10)) == {y % 10 for y in seen}
    # The canvases show the labelled digits: the packaged classifier reads both halves.
    from sde_diffusion.evaluation.digits_classifier import classify

    x, y = next(iter(dm.val_dataloader()))
    left, right = halves(x)
    acc = ((classify(left) == y // 10) & (classify(right) == y % 10)).float().mean()
    assert acc > 0.85
    # Captions of (a, b) and (b, a) never coincide, and each names both digits.
    for a, b in [(3, 8), (0, 1), (5, 6)]:
        assert not set(paraphrases(a, b)) & set(paraphrases(b, a))
    assert "an eight to the right of a three" in paraphrases(3, 8) and "3 then 8" in paraphrases(3, 8)
    assert set(dm.captions(torch.tensor([38, 38, 38]), torch.Generator().manual_seed(0))) <= set(paraphrases(3, 8))


def test_folder_metadata_gives_captions_and_names_a_missing_file(tmp_path):
    from PIL import Image

    from sde_diffusion.data.folder import FolderDataModule

    for i in range(4):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(tmp_path / f"im{i}.png")
    rows = [{"file_name": f"im{i}.png", "text": f"grey level {i}"} for i in range(4)]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dm = FolderDataModule(root=tmp_path, image_size=8, channels=1, val_fraction=0.25, num_workers=0, batch_size=3)
    dm.setup()
    assert dm.has_captions
    x, y = next(iter(dm.train_dataloader()))
    for img, cap in zip(x, dm.captions(y)):
        level = int(cap.split()[-1])
        assert abs(float((img.mean() + 1) / 2 * 255) - 40 * level) < 1
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "gone.png", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="line 1: file_name 'gone.png' does not exist"):
        FolderDataModule(root=tmp_path, image_size=8, channels=1, num_workers=0).setup()


def test_caption_dropout_rate_and_slicing():
    from sde_diffusion.tasks.score_matching import batch_captions

    dm = DigitPairsDataModule()
    y = torch.full((4000,), 38)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        caps = batch_captions(dm, y, slice(0, 4000), 4000, 0.3, torch.Generator().manual_seed(1))
    share = sum(c == "" for c in caps) / 4000
    assert abs(share - 0.3) < 3 * np.sqrt(0.3 * 0.7 / 4000)
    with pytest.raises(ValueError, match="captioned data set"):
        batch_captions(object(), y, slice(0, 4), 4, 0.0)


# ----------------------------------------------------------------------------- training, checkpoints, sampling
def _train(run_dir: Path, *extra: str) -> Path:
    from hydra import compose, initialize_config_dir

    from sde_diffusion.fit import fit

    torch.set_num_threads(1)
    over = ["data=digit_pairs", "data.n_train=256", "data.n_val=64", "data.batch_size=32", "model.ch=8",
            "conditioning.text.dim=16", "conditioning.text.heads=2", "conditioning.text.layers=1",
            "trainer.max_steps=3", "logger=csv", "callbacks.samples.enabled=false", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "callbacks.loss_by_t.every_n_steps=0", "optim.warmup_steps=0",
            "optim.lr=1e-3", f"run_dir={run_dir}", *extra]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=over)
    fit("score", cfg, output_dir=run_dir)
    return run_dir


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("text") / "run", "conditioning.text.encoder=tiny")


def _sample(run: Path, *extra: str):
    from sde_diffusion.jobs import cli, run as run_job

    return run_job(cli.compose([f"ckpt={run}", "progress=false", *extra], CONF))


def test_checkpoint_round_trips_the_tokenizer_and_the_encoder(text_run):
    from sde_diffusion.jobs.model import load_model

    loaded = load_model(text_run)
    module = loaded.module
    rec = module.text_record()
    assert rec["encoder"] == "tiny" and rec["tokenizer"]["kind"] == "word"
    assert rec["tokenizer"]["vocab"] == WordTokenizer.from_captions(all_captions(training_pairs()), 16).vocab
    ck = torch.load(text_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    enc_keys = [k for k in ck["state_dict"] if k.startswith("net.text_encoder.")]
    assert enc_keys and all(k in ck["current_model_state"] for k in enc_keys)
    # The trained encoder's weights, not a fresh one: they moved away from initialisation and match the file.
    torch.testing.assert_close(module.net.text_encoder.token.weight, ck["current_model_state"]["net.text_encoder.token.weight"])
    score = loaded.score_model(use_ema=True)
    c = module.encode_prompts(["3 left of 8"])
    x, t = torch.randn(2, 1, 8, 16), torch.full((2,), 0.5)
    a = score(x, t, **c)
    b = load_model(text_run).score_model(use_ema=True)(x, t, **load_model(text_run).module.encode_prompts(["3 left of 8"]))
    torch.testing.assert_close(a, b)


def test_another_encoder_is_refused(text_run):
    from sde_diffusion.config import saved_train_config
    from sde_diffusion.tasks.score_matching import ScoreDiffusion

    ck = torch.load(text_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    hp = ck["hyper_parameters"]
    cfg = json.loads(json.dumps(hp["cfg"]))
    cfg["conditioning"]["text"]["encoder"] = "hf"
    with pytest.raises(ValueError, match="checkpoint's text encoder is 'tiny'"):
        ScoreDiffusion(saved_train_config(cfg), hp["data_shape"], None, text=hp["text"])


SAMPLER_GROUPS = sorted(p.stem for p in (CONF / "sampler").glob("*.yaml"))


@pytest.mark.parametrize("sampler", ["auto", "pc", "ddim"])
def test_sample_py_takes_a_prompt(text_run, tmp_path, sampler):
    report = _sample(text_run, f"sampler={sampler}", "steps=4", "n=2", "batch_size=2", "prompt=3 left of 8",
                     "guidance.scale=1.5", f"out={tmp_path}", "figures=false")
    with np.load(tmp_path / "samples.npz") as z:
        assert z["samples"].shape == (2, 8, 16, 1) and (z["prompt_index"] == 0).all()
    assert report["guidance"]["prompts"] == ["3 left of 8"] and report["nonfinite_samples"] == 0


def test_every_sampler_takes_a_prompt_and_guidance(text_run):
    # Every sampler group of conf/sampler, as sample.py builds it, on the guided score of a prompt.
    from sde_diffusion import sample
    from sde_diffusion.config import parse_sample
    from sde_diffusion.guidance import ContextGuidance
    from sde_diffusion.jobs import cli
    from sde_diffusion.jobs.model import load_model
    from sde_diffusion.jobs.sample_job import choose_sampler

    loaded = load_model(text_run)
    module, score = loaded.module, loaded.score_model(use_ema=True)
    c, u = module.encode_prompts(["3 left of 8"] * 2), module.encode_prompts([""])
    guided = ContextGuidance(score, c["context"], c["context_mask"], u["context"], u["context_mask"], 1.5)
    for name in SAMPLER_GROUPS:
        cfg = parse_sample(cli.compose([f"ckpt={text_run}", f"sampler={name}", "steps=4"], CONF))
        choice = choose_sampler(loaded.sde, cfg)
        with torch.no_grad():
            out = sample(loaded.sde, guided, (2, *loaded.model_shape), sampler=choice.sampler, steps=choice.steps,
                         generator=torch.Generator().manual_seed(0)).samples
        assert out.shape == (2, 1, 8, 16) and torch.isfinite(out).all(), name


def test_guidance_is_the_cfg_combination_of_one_batched_call(text_run):
    from sde_diffusion.guidance import ContextGuidance
    from sde_diffusion.jobs.model import load_model

    loaded = load_model(text_run)
    for m in loaded.module.ema.modules():  # make the prompt matter in this barely trained net
        if type(m).__name__ == "CrossAttnBlock":
            torch.nn.init.normal_(m.proj.weight, std=0.3)
    score, module = loaded.score_model(use_ema=True), loaded.module
    c, u = module.encode_prompts(["3 left of 8", "a one then 9"]), module.encode_prompts([""])
    x, t = torch.randn(2, 1, 8, 16), torch.tensor([0.4, 0.7])
    g = ContextGuidance(score, c["context"], c["context_mask"], u["context"], u["context_mask"], 2.0)(x, t)
    sc = score(x, t, **c)
    su = score(x, t, context=u["context"].expand(2, -1, -1), context_mask=u["context_mask"].expand(2, -1))
    torch.testing.assert_close(g, 3.0 * sc - 2.0 * su, rtol=1e-5, atol=1e-5)
    assert (sc - su).abs().max() > 1e-4
    g0 = ContextGuidance(score, c["context"], c["context_mask"], u["context"], u["context_mask"], 0.0)(x, t)
    torch.testing.assert_close(g0, sc)


def test_prompts_file_n_each_grids_titled_and_recorded(text_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("3 left of 8\n\nan eight then a one\n")
    report = _sample(text_run, f"prompts={prompts}", "n=3", "batch_size=4", "steps=3", "sampler=ddim",
                     f"out={tmp_path / 'out'}", "negative_prompt=9 then 9", "guidance.scale=2")
    with np.load(tmp_path / "out" / "samples.npz") as z:
        assert z["samples"].shape[0] == 6 and z["prompt_index"].tolist() == [0, 0, 0, 1, 1, 1]
    assert report["n"] == 6 and report["guidance"]["negative_prompt"] == "9 then 9"
    assert set(report["files"]) >= {"grid", "grid_001"}
    run_json = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run_json["guidance"]["prompts"] == ["3 left of 8", "an eight then a one"]


def test_bad_prompts_are_refused_before_sampling(text_run, tmp_path):
    with pytest.raises(ValueError, match="never saw in training: above"):
        _sample(text_run, "prompt=3 above 8", "n=2", f"out={tmp_path / 'a'}")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompt"):
        _sample(text_run, f"prompts={empty}", "n=2", f"out={tmp_path / 'b'}")
    with pytest.raises(ValueError, match="is a text model; say what to draw with prompt="):
        _sample(text_run, "label=3", "n=2", f"out={tmp_path / 'c'}")
    assert not any((tmp_path / d).exists() for d in "abc")
    with pytest.warns(UserWarning, match="cut to fit"):
        _sample(text_run, "prompt=3 then 8 then 3 then 8 then 3 then 8 then 3 then 8 then 3 then 8", "n=1", "steps=2",
                "sampler=ddim", f"out={tmp_path / 'd'}", "figures=false")


def test_a_prompt_to_a_model_without_text_is_refused(tmp_path):
    run = _train(tmp_path / "plain", "conditioning.text.encoder=null", "trainer.max_steps=1")
    with pytest.raises(ValueError, match="trained without text"):
        _sample(run, "prompt=3 left of 8", "n=2", f"out={tmp_path / 'x'}")
    assert not (tmp_path / "x").exists()


def test_inpainting_with_a_prompt_keeps_the_observed_pixels(text_run, tmp_path):
    _sample(text_run, "task=inpaint", "mask=right", "prompt=3 left of 8", "n=2", "batch_size=2", "steps=4",
            "sampler=euler_maruyama", f"out={tmp_path}", "guidance.scale=1")
    with np.load(tmp_path / "samples.npz") as z:
        obs, out = z["observed"], z["samples"]
    assert np.array_equal(out[:, :, :8], obs[:, :, :8])   # the left half is observed


# ----------------------------------------------------------------------------- the hf path
def _tiny_clip(path: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted({w for c in all_captions() for w in c.split()})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                                bos_token="[BOS]", eos_token="[EOS]", model_max_length=12)
    fast.save_pretrained(str(path))
    config = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=12, pad_token_id=0,
                                         bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    transformers.CLIPTextModel(config).save_pretrained(str(path))
    return path


def test_hf_encoder_from_a_local_directory_trains_and_samples(tmp_path):
    clip = _tiny_clip(tmp_path / "clip")
    run = _train(tmp_path / "run", "conditioning.text.encoder=hf", f"conditioning.text.name={clip}",
                 "conditioning.text.max_length=12", "trainer.max_steps=2")
    ck = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    rec = ck["hyper_parameters"]["text"]
    assert rec["encoder"] == "hf" and len(rec["weights_sha256"]) == 64 and rec["dim"] == 16
    assert not any("text_model" in k or "text_encoder" in k for k in ck["state_dict"])   # frozen weights stay outside
    report = _sample(run, "prompt=3 left of 8", "n=2", "steps=3", "sampler=ddim", f"out={tmp_path / 's'}", "figures=false",
                     "guidance.scale=1")
    assert report["guidance"]["text_encoder"]["encoder"] == "hf"
    # Other weights under the same name are refused.
    import transformers

    model = transformers.CLIPTextModel.from_pretrained(str(clip))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    model.save_pretrained(str(clip))
    with pytest.raises(ValueError, match="other weights"):
        _sample(run, "prompt=3 left of 8", "n=2", f"out={tmp_path / 't'}")


def test_hf_encoder_missing_files_say_how_to_get_them(tmp_path):
    pytest.importorskip("transformers")
    from sde_diffusion.text import build_text_encoder

    with pytest.raises(FileNotFoundError, match="Nothing is downloaded here"):
        build_text_encoder("hf", name=str(tmp_path / "nowhere"))


def test_latent_text_model_runs_end_to_end(tmp_path):
    from hydra import compose, initialize_config_dir

    from sde_diffusion.fit import fit

    torch.set_num_threads(1)
    over = ["task=autoencoder", "data=digit_pairs", "data.n_train=128", "data.n_val=32", "data.batch_size=32",
            "autoencoder.ch=8", "autoencoder.ch_mult=[1,2]", "autoencoder.latent_channels=2",
            "autoencoder.figures_every_n_steps=0", "trainer.max_steps=2", "logger=csv", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", f"run_dir={tmp_path / 'ae'}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        fit("autoencoder", compose("train", overrides=over), output_dir=tmp_path / "ae")
    run = _train(tmp_path / "latent", "conditioning.text.encoder=tiny", f"latent={tmp_path / 'ae'}",
                 "model.attn_resolutions=[2]", "trainer.max_steps=2")
    report = _sample(run, "prompt=3 left of 8", "n=2", "steps=3", "sampler=ddim", f"out={tmp_path / 's'}",
                     "guidance.scale=2")
    with np.load(tmp_path / "s" / "samples.npz") as z:
        assert z["samples"].shape == (2, 8, 16, 1) and z["latents"].shape == (2, 2, 4, 8)
    assert report["guidance"]["prompts"] == ["3 left of 8"]
