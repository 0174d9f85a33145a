"""The first commands a new user types, with nothing prepared: each ends with one line that says what is missing
and which command makes it (a non-zero exit, nothing written)."""
import importlib

import pytest


@pytest.mark.parametrize("command, missing, maker", [
    (["pretrain", "--size", "300M"], "no --data given", "python tokenize_data.py images --input PHOTOS"),
    (["finetune"], "stage 2 starts from stage-1 weights", "python pretrain.py --data="),
    (["finetune", "--init_from=nowhere"], "--init_from=nowhere", "no checkpoint at nowhere"),
    (["sample"], "pass --model and --vqgan", "python run_toy.py"),
    (["evaluate"], "pass a protocol", "python run_toy.py"),
    (["evaluate", "segmentation", "--model", "m"], "segmentation needs --vqgan and --data", "python run_toy.py"),
])
def test_first_command_without_its_inputs_says_what_is_missing_and_what_makes_it(tmp_path, monkeypatch, capsys,
                                                                                   command, missing, maker):
    monkeypatch.chdir(tmp_path)  # where the default out/ folders would go
    with pytest.raises(SystemExit) as stop:
        importlib.import_module(command[0]).main(command[1:])
    code = stop.value.code  # sys.exit("error: ...") prints the text and exits with 1; argparse exits with 2
    lines = (code if isinstance(code, str) else capsys.readouterr().err).strip().splitlines()
    assert code not in (0, None) and missing in lines[-1] and maker in lines[-1]
    assert not any(tmp_path.iterdir())  # nothing written
