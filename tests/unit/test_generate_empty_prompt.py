"""`raylm generate --prompt ""`: a prompt of no tokens is refused in one line naming it, as the
server refuses it ("prompt: encodes to no tokens"). It sampled a continuation of EOS instead,
text the prompt never asked for and the server never gives for the same settings."""

from raylm.cli import main


def test_an_empty_prompt_is_refused_naming_it(tiny_run, capsys):
    assert main(["generate", tiny_run, "--prompt", "ok", "--prompt", "", "--max-new-tokens", "3"]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # nothing printed for the prompts before it either
    assert err == "raylm: error: --prompt #2 '': encodes to no tokens; give some text (or --chat, where it is a " \
                  "user turn)\n"


def test_an_empty_chat_turn_still_answers(tiny_run, capsys):
    assert main(["generate", tiny_run, "--chat", "--prompt", "", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.endswith("---\n")
