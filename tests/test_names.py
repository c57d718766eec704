"""Save names are refused before any merge when a file system would refuse them (lib_merge.names)."""
from __future__ import annotations

import os

import pytest
import torch

from lib_merge.errors import OutputError
from lib_merge.names import NAME_MAX, TEMP_OVERHEAD, check_save_name, max_name_bytes, name_limit
from lib_merge.writer import SafetensorsWriter

SUFFIX = ".safetensors"


def test_ordinary_names_get_the_suffix(tmp_path):
    assert check_save_name("my merge v2", str(tmp_path)) == "my merge v2.safetensors"
    assert check_save_name("x.safetensors", str(tmp_path)) == "x.safetensors"
    assert check_save_name("ünïcode merge", str(tmp_path)) == "ünïcode merge.safetensors"
    for fine in ("console", "nullable", "com10", "lpt0", "auxiliary.v2", "CON-merge"):
        assert check_save_name(fine) == fine + SUFFIX


@pytest.mark.parametrize("name", ["CON", "con", "nul.txt", "Aux .x", "COM1", "com¹", "LPT9.safetensors", "conin$",
                                  "CONOUT$.merge", "prn.tar"])
def test_windows_device_names_are_refused_in_every_form(name):
    with pytest.raises(OutputError, match="reserved device name"):
        check_save_name(name)


@pytest.mark.parametrize("name", ["a\x7fb", "a\udc80b", "a:b", "a|b", "a\x00b", "sub/dir", "..\\up", ".hidden", ""])
def test_characters_file_systems_refuse(name):
    with pytest.raises(OutputError):
        check_save_name(name)


def test_a_300_character_name_is_refused_with_its_length(tmp_path):
    with pytest.raises(OutputError, match=r"too long: 312 bytes") as info:
        check_save_name("a" * 300, str(tmp_path))
    message = str(info.value)
    assert "\n" not in message and "(300 characters)" in message and len(message) < 300, message


def test_length_counts_bytes_not_characters(tmp_path):
    name = "あ" * 75          # 75 characters, 225 bytes of UTF-8
    assert len(name) < max_name_bytes(str(tmp_path))
    with pytest.raises(OutputError, match="too long: 237 bytes"):
        check_save_name(name, str(tmp_path))


def test_the_longest_accepted_name_really_saves_and_one_byte_more_is_refused(tmp_path):
    """The limit is exactly what the writer needs: its hidden temporary file fits the file system too."""
    folder = str(tmp_path)
    most = max_name_bytes(folder)
    assert most == name_limit(folder) - TEMP_OVERHEAD
    longest = "m" * (most - len(SUFFIX))
    filename = check_save_name(longest, folder)
    path = os.path.join(folder, filename)
    tensor = torch.arange(4, dtype=torch.float16)
    with SafetensorsWriter(path, [("w", (4,), torch.float16)]) as writer:
        writer.write("w", tensor)
        writer.commit({})
    assert os.path.getsize(path) > 0 and len(filename.encode()) == most
    with pytest.raises(OutputError, match="too long"):
        check_save_name(longest + "m", folder)


def test_this_file_system_really_refuses_what_is_over_the_limit(tmp_path):
    """The reason for the check: the OSError the merge used to hit only after merging."""
    if name_limit(str(tmp_path)) != NAME_MAX:
        pytest.skip("this file system has another name limit")
    with pytest.raises(OSError):
        open(tmp_path / ("a" * (NAME_MAX + 1)), "wb").close()


def test_a_path_longer_than_the_system_allows_is_refused():
    deep = os.path.join(os.path.abspath(os.sep), *(["d" * 200] * 21))   # about 4200 characters; need not exist
    with pytest.raises(OutputError, match="path too long"):
        check_save_name("merge", deep)
