"""Chat templates (rendered as transformers renders them), the cached multi-turn session, and
the `chat` and `generate --chat` commands."""

from __future__ import annotations

import functools
import json
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from gptcli.chat import (
    ChatSession,
    ChatTemplate,
    ChatTemplateError,
    TurnTooLong,
    common_prefix,
    conversation,
    end_of_turn_ids,
    read_message,
)
from gptcli.generate import Generation
from gptcli.loader import load_model
from gptcli.sampling import SamplingParams, make_generator
from gptcli.tokenizer import Tokenizer

from .conftest import DEFAULT_MODEL, GPT2_BPE, build_hf_model, save_checkpoint
from .test_cli import GPTCLI, run

GREEDY = SamplingParams(temperature=0)

CHATML = (
    "{%- for message in messages %}\n"
    "    {%- if loop.first and message['role'] != 'system' %}\n"
    "        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] not in ['system', 'user', 'assistant'] %}\n"
    "        {{- raise_exception('Unknown role: ' + message['role']) }}\n"
    "    {%- endif %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim }}\n"
    "    {{- '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# Meta's Llama-2 template, in the undashed style that relies on trim_blocks and lstrip_blocks.
LLAMA2 = """{% if messages[0]['role'] == 'system' %}
    {% set loop_messages = messages[1:] %}
    {% set system_message = messages[0]['content'] %}
{% else %}
    {% set loop_messages = messages %}
    {% set system_message = false %}
{% endif %}
{% for message in loop_messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if loop.index0 == 0 and system_message != false %}
        {% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}
    {% else %}
        {% set content = message['content'] %}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}
    {% elif message['role'] == 'assistant' %}
        {{ ' ' + content.strip() + ' ' + eos_token }}
    {% endif %}
{% endfor %}
"""

# tojson (no HTML escaping, non-ASCII kept), namespace, loop controls and {% generation %}.
JSONISH = """{% set ns = namespace(turns=0) %}
{% for message in messages %}
{% if message.role == 'system' %}{% continue %}{% endif %}
{% set ns.turns = ns.turns + 1 %}
{% if message.role == 'assistant' %}{% generation %}{{ message | tojson }}{% endgeneration %}
{% else %}{{ message | tojson(sort_keys=true) }}
{% endif %}
{% endfor %}
turns={{ ns.turns }}{{ eos_token }}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

CONVERSATIONS = {
    "system+user": [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "What is the capital of France?"},
    ],
    "multi-turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi <b>there</b> & 'you' — ça va?"},
        {"role": "assistant", "content": " Hello! I am fine. "},
        {"role": "user", "content": "Count to three.\nThen stop."},
    ],
    "no-system": [{"role": "user", "content": "Tell me a joke."}],
    "no-system-multi": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ],
}


def write_tokenizer_config(folder, template, **tokens):
    config = {"chat_template": template, **tokens}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def template_dirs(tmp_path_factory, default_model_dir):
    """name -> a folder whose tokenizer_config.json holds that template style."""
    root = tmp_path_factory.mktemp("templates")
    dirs = {"default": default_model_dir}
    for name, template in (("chatml", CHATML), ("jsonish", JSONISH)):
        folder = root / name
        folder.mkdir()
        shutil.copy(DEFAULT_MODEL / "tokenizer.json", folder / "tokenizer.json")
        dirs[name] = write_tokenizer_config(
            folder,
            template,
            tokenizer_class="PreTrainedTokenizerFast",
            bos_token="<|im_start|>",
            eos_token="<|im_end|>",
            unk_token="<|endoftext|>",
        )
    folder = root / "llama2"
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(GPT2_BPE / name, folder)
    dirs["llama2"] = write_tokenizer_config(
        folder,
        LLAMA2,
        tokenizer_class="GPT2Tokenizer",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    return dirs


@pytest.mark.parametrize("style", ["default", "chatml", "llama2", "jsonish"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_equals_transformers(template_dirs, style, name, add_generation_prompt):
    import transformers

    folder = template_dirs[style]
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    messages = CONVERSATIONS[name]
    expected = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    ours = ChatTemplate.from_dir(folder).render(messages, add_generation_prompt)
    assert ours == expected


def test_default_template_rendering_is_what_smollm_expects(default_model_dir):
    template = ChatTemplate.from_dir(default_model_dir)
    assert template.render(conversation("Hi", "Be brief.")) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_raise_exception_becomes_one_clear_error(template_dirs):
    template = ChatTemplate.from_dir(template_dirs["llama2"])
    with pytest.raises(ChatTemplateError) as info:
        template.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert str(info.value) == (
        "the chat template refused the conversation: "
        "Conversation roles must alternate user/assistant/user/assistant/..."
    )


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.system('echo pwned') }}",
        "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
        "{{ messages.append(1) }}",  # the environment is immutable
    ],
)
def test_the_sandbox_stops_python_access(source):
    template = ChatTemplate(source, origin="evil/tokenizer_config.json")
    with pytest.raises(ChatTemplateError) as info:
        template.render([{"role": "user", "content": "x"}])
    assert str(info.value).startswith("evil/tokenizer_config.json: the chat template ")


def test_a_template_that_writes_without_end_is_stopped():
    source = (
        "{% for a in range(99999) %}{% for b in range(99999) %}xxxxxxxx{% endfor %}{% endfor %}"
    )
    template = ChatTemplate(source, origin="evil/tokenizer_config.json")
    with pytest.raises(ChatTemplateError) as info:
        template.render([{"role": "user", "content": "x"}])
    assert str(info.value) == (
        "evil/tokenizer_config.json: the chat template wrote more than 10,000,000 characters "
        "and was stopped"
    )


def test_template_syntax_error_names_the_line():
    with pytest.raises(ChatTemplateError, match="syntax error on line 2"):
        ChatTemplate("ok\n{% for %}", origin="m/tokenizer_config.json")


def test_a_model_without_template_is_refused(tiny_models):
    folder = tiny_models["gpt2"][1]
    with pytest.raises(ChatTemplateError, match="no chat template"):
        ChatTemplate.from_dir(folder)


def test_end_of_turn_tokens(template_dirs):
    for style, expected in (("default", {2}), ("chatml", {2}), ("llama2", {50256})):
        folder = template_dirs[style]
        tokenizer = Tokenizer.from_dir(folder)
        assert end_of_turn_ids(ChatTemplate.from_dir(folder, tokenizer), tokenizer) == expected


def test_read_message_joins_backslash_lines():
    lines = iter(["first\\\n", "second\\\n", "third\n", "next\n"])
    asked = []
    assert read_message(lambda: next(lines, ""), asked.append) == "first\nsecond\nthird"
    assert asked == ["> ", "... ", "... "]
    assert read_message(lambda: next(lines, ""), asked.append) == "next"
    assert read_message(lambda: next(lines, ""), asked.append) is None


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2, 3]) == 2


# --- the cached session equals generating each turn from scratch ------------------------------


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory, template_dirs, tiny_models, default_model_dir):
    """name -> model folder: the default model, a tiny Llama with the SmolLM tokenizer and a
    ChatML template, and the tiny GPT-2 with a Llama-2 [INST] template (context 128)."""
    root = tmp_path_factory.mktemp("chat-models")
    chatml = save_checkpoint(build_hf_model("llama", True, 2, seed=11, vocab=49152), root / "c")
    (chatml / "vocab.json").unlink()
    (chatml / "merges.txt").unlink()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(template_dirs["chatml"] / name, chatml / name)
    llama2 = root / "l"
    shutil.copytree(tiny_models["gpt2"][1], llama2)
    shutil.copy(template_dirs["llama2"] / "tokenizer_config.json", llama2)
    return {"default": default_model_dir, "tiny-chatml": chatml, "tiny-llama2": llama2}


@functools.cache
def cached_model(folder):
    return load_model(folder)  # inference only: tests may share it


def make_session(folder, max_new_tokens, system=None, params=GREEDY, stops=()):
    model = cached_model(folder)
    tokenizer = Tokenizer.from_dir(folder)
    template = ChatTemplate.from_dir(folder, tokenizer)
    return ChatSession(
        model,
        tokenizer,
        template,
        params=params,
        max_new_tokens=max_new_tokens,
        system=system,
        generator=make_generator(0),
        stops=stops,
        eos_ids=set(model.config.eos_token_ids) | set(tokenizer.eos_ids),
    )


def from_scratch(session, prompt_ids):
    generation = Generation(
        session.model,
        prompt_ids,
        session.max_new_tokens,
        session.params,
        make_generator(0),
        session.eos_ids,
    )
    return list(generation), generation.finish_reason


def check_turn(session, text):
    """One turn: the reply streams, and equals a from-scratch greedy run on the rendered
    conversation; returns the turn's stats."""
    reply = "".join(session.respond(text))
    stats = session.last
    # What was rendered: the conversation up to this message (less any turns dropped).
    assert session.messages[-2] == {"role": "user", "content": text}
    rendered = session.template.render(session.messages[:-1])
    assert stats.prompt_ids == session.tokenizer.encode(rendered)
    new_ids, finish = from_scratch(session, stats.prompt_ids)
    assert stats.new_ids == new_ids
    assert stats.finish_reason == finish
    assert reply == stats.text == session.tokenizer.decode(new_ids)
    assert session.messages[-1] == {"role": "assistant", "content": reply}
    return stats


@pytest.mark.parametrize(("name", "n"), [("default", 12), ("tiny-chatml", 10), ("tiny-llama2", 8)])
def test_cached_turns_equal_generating_from_scratch(chat_models, name, n):
    session = make_session(chat_models[name], n, system="You are terse.")
    turns = ["Hi! Who are you?", "What is 2+2?", "Name a colour."]
    previous_prompt: list[int] = []
    for text in turns:
        stats = check_turn(session, text)
        # Only the new turn was fed: the cache held at least the whole previous prompt.
        assert stats.reused_tokens >= len(previous_prompt)
        assert stats.prompt_ids[: len(previous_prompt)] == previous_prompt
        previous_prompt = stats.prompt_ids
    assert [m["role"] for m in session.messages] == ["system"] + ["user", "assistant"] * 3


def test_special_tokens_never_appear_in_replies(chat_models):
    session = make_session(chat_models["default"], 40)
    reply = "".join(session.respond("Say hello."))
    assert session.last.finish_reason == "eos"  # <|im_end|> ended the turn
    assert "<|im_end|>" not in reply and "<|im_start|>" not in reply


def test_full_context_drops_the_oldest_turns_keeping_the_system(chat_models):
    session = make_session(chat_models["tiny-llama2"], 20, system="Sys")
    for i in range(6):
        check_turn(session, f"message number {i} with some more words in it")
    notices = list(session.notices)
    assert notices and "dropped the oldest 2 messages" in notices[0]
    assert session.messages[0] == {"role": "system", "content": "Sys"}
    assert session.messages[1]["role"] == "user"
    assert len(session.last.prompt_ids) + 20 <= 128


def test_a_message_longer_than_the_context_is_refused_and_forgotten(chat_models):
    session = make_session(chat_models["tiny-llama2"], 5)
    check_turn(session, "short")
    before = list(session.messages)
    with pytest.raises(TurnTooLong, match="more than the model's context of 128"):
        session.respond("word " * 200)
    assert session.messages == before  # nothing dropped for a refused message
    assert session.notices == []
    check_turn(session, "another")


def test_interrupted_reply_keeps_the_shown_text_and_the_next_turn_is_exact(chat_models):
    session = make_session(chat_models["tiny-chatml"], 10)
    stream = session.respond("Tell me something")
    shown = next(stream) + next(stream)
    stream.close()  # what Ctrl-C during a reply does
    assert session.last.finish_reason == "interrupted"
    assert session.messages[-1] == {"role": "assistant", "content": shown}
    check_turn(session, "And then?")


def test_reset_forgets_all_but_the_system_message(chat_models):
    session = make_session(chat_models["tiny-chatml"], 6, system="S")
    first = check_turn(session, "Hello")
    check_turn(session, "Again")
    session.reset()
    assert session.messages == [{"role": "system", "content": "S"}]
    again = check_turn(session, "Hello")
    assert again.new_ids == first.new_ids
    assert again.reused_tokens > 0  # the system prompt's keys were still in the cache


def test_stop_string_ends_a_reply(chat_models):
    full = make_session(chat_models["tiny-chatml"], 12)
    text = "".join(full.respond("Hi"))
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    session = make_session(chat_models["tiny-chatml"], 12, stops=[stop])
    assert "".join(session.respond("Hi")) == text[: text.index(stop)]
    assert session.last.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(chat_models):
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = make_session(chat_models["tiny-chatml"], 8, params=params)
    b = make_session(chat_models["tiny-chatml"], 8, params=params)
    assert ["".join(a.respond(t)) for t in "xy"] == ["".join(b.respond(t)) for t in "xy"]


# --- the commands -----------------------------------------------------------------------------


def session_replies(folder, turns, n, system=None):
    session = make_session(folder, n, system=system)
    return "".join("".join(session.respond(text)) + "\n" for text in turns)


def test_chat_command_with_piped_turns(chat_models):
    folder = chat_models["tiny-chatml"]
    piped = "Hello there\nSecond line\\\ncontinued\n\n/exit\nnever sent\n"
    result = run(
        ["chat", "-m", str(folder), "--temp", "0", "-n", "9", "--system", "S", "-v"],
        input=piped.encode(),
    )
    assert result.returncode == 0, result.stderr.decode()
    expected = session_replies(folder, ["Hello there", "Second line\ncontinued"], 9, system="S")
    assert result.stdout.decode() == expected
    stderr = result.stderr.decode()
    assert stderr.count("tok/s") == 2  # one stats line per reply
    assert "> " not in stderr  # no prompts when stdin is not a terminal


def test_chat_command_reset_and_end_of_input(chat_models):
    folder = str(chat_models["tiny-llama2"])
    result = run(["chat", "-m", folder, "--temp", "0", "-n", "6"], input=b"Hi\n/reset\nHi")
    assert result.returncode == 0, result.stderr.decode()
    first, second, rest = result.stdout.decode().split("\n")
    assert first == second and rest == ""
    assert "conversation cleared" in result.stderr.decode()


def test_chat_command_on_the_default_model():
    result = run(["chat", "--temp", "0", "-n", "20"], input=b"What is 2+2?\n/exit\n")
    assert result.returncode == 0, result.stderr.decode()
    expected = session_replies(DEFAULT_MODEL, ["What is 2+2?"], 20)
    assert result.stdout.decode() == expected
    assert "<|im" not in expected


def test_chat_command_reports_a_too_long_turn_and_goes_on(chat_models):
    folder = str(chat_models["tiny-llama2"])
    piped = ("word " * 200 + "\na\0b\nHi\n").encode()
    result = run(["chat", "-m", folder, "--temp", "0", "-n", "4"], input=piped)
    assert result.returncode == 1
    assert result.stdout.decode() == session_replies(chat_models["tiny-llama2"], ["Hi"], 4)
    errors = [line for line in result.stderr.decode().splitlines() if "error" in line]
    assert len(errors) == 2 and "context of 128" in errors[0]
    assert errors[1] == "error: message: contains NUL bytes; is it binary data?"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["-n", "0"], 2, "--max-new-tokens"),
        (["--temp", "-1"], 2, "--temp"),
        (["--stop", ""], 2, "--stop"),
        (["-m", "/nonexistent/model"], 1, "no such folder"),
    ],
)
def test_chat_command_bad_input(args, code, message):
    result = run(["chat", *args], input=b"Hi\n")
    assert result.returncode == code
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert b"Traceback" not in result.stderr


def test_chat_command_on_a_model_without_template(tiny_models):
    result = run(["chat", "-m", str(tiny_models["gpt2"][1])], input=b"Hi\n")
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "no chat template" in lines[0]


@pytest.mark.parametrize(
    ("name", "system"),
    [("default", "You are a pirate."), ("tiny-chatml", None), ("tiny-chatml", "S")],
)
def test_generate_chat_equals_feeding_the_rendered_template(chat_models, name, system):
    import transformers

    folder = chat_models[name]
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    rendered = hf.apply_chat_template(
        conversation("Name three fruits.", system), tokenize=False, add_generation_prompt=True
    )
    ids = hf(rendered, add_special_tokens=False)["input_ids"]
    model = cached_model(folder)
    tokenizer = Tokenizer.from_dir(folder)
    eos = set(model.config.eos_token_ids) | set(tokenizer.eos_ids) | {2}  # 2 = <|im_end|>
    generation = Generation(model, ids, 16, GREEDY, make_generator(0), eos)
    expected = tokenizer.decode(list(generation))

    args = ["generate", "-m", str(folder), "--chat", "--temp", "0", "-n", "16"]
    args += ["--system", system] if system is not None else []
    result = run([*args, "Name three fruits."])
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode() == expected
    if name == "default":
        return
    record = json.loads(run([*args, "--json", "Name three fruits."]).stdout)
    assert record["prompt_tokens"] == len(ids)
    assert record["text"] == expected


def test_generate_system_needs_chat(tiny_models):
    result = run(["generate", "-m", str(tiny_models["gpt2"][1]), "--system", "S", "Hi"])
    assert result.returncode == 2
    assert "--system needs --chat" in result.stderr.decode()


def test_help_imports_neither_torch_nor_jinja_nor_the_hub():
    code = (
        "import sys\n"
        "from gptcli import cli\n"
        "for argv in (['gptcli', '--help'], ['gptcli', 'chat', '--help'],"
        " ['gptcli', 'download', '--help']):\n"
        "    sys.argv = argv\n"
        "    try:\n        cli.main()\n    except SystemExit:\n        pass\n"
        "print(sorted(m for m in ('torch', 'jinja2', 'huggingface_hub') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "chat" in out.stdout and "download" in out.stdout
    assert out.stdout.strip().endswith("[]")


def test_the_cache_grows_with_the_conversation_keeping_what_it_held(chat_models):
    session = make_session(chat_models["tiny-chatml"], 4)
    check_turn(session, "a")
    size = session.cache.max_len
    for i in range(8):
        check_turn(session, f"turn {i} " + "padding words " * 3)
    assert session.cache.max_len > size
    assert session.cache.k.dtype == torch.float32


def test_ctrl_c_at_the_prompt_leaves_with_130(chat_models):
    folder = str(chat_models["tiny-chatml"])
    proc = subprocess.Popen(
        [*GPTCLI, "chat", "-m", folder, "--temp", "0", "-n", "3"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        proc.stdin.write(b"Hi\n")
        proc.stdin.flush()
        reply = proc.stdout.readline()  # the reply is out: now it waits for the next turn
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert reply == session_replies(chat_models["tiny-chatml"], ["Hi"], 3).encode()
    assert proc.returncode == 130
    assert stderr.decode().strip().splitlines()[-1] == "interrupted"
