"""The command line lives in `jaxmamba/cli/`: the library neither parses arguments nor prints."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaxmamba"

#: Library modules that may print, and why: each prints the last words of a process that ends
#: itself right after (`os._exit`), where no caller is left to tell.
MAY_PRINT = {
    "train/signals.py": "a second signal stops the process at once",
    "distributed.py": "a multi-process join that timed out ends the process",
}


def _library_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if not rel.startswith("cli/"):
            yield rel, ast.parse(path.read_text(), filename=str(path))


def test_library_modules_neither_parse_arguments_nor_print():
    offences = []
    for rel, tree in _library_modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if "argparse" in names:
                    offences.append(f"{rel}:{node.lineno}: imports argparse")
            elif (isinstance(node, ast.FunctionDef) and node.name == "add_arguments"
                  and node.col_offset == 0):
                offences.append(f"{rel}:{node.lineno}: defines add_arguments")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id == "print" and rel not in MAY_PRINT):
                offences.append(f"{rel}:{node.lineno}: calls print")
    assert not offences, "command-line code outside jaxmamba/cli/:\n" + "\n".join(offences)


def test_every_command_has_its_module_in_the_cli_package():
    from jaxmamba.cli import COMMANDS

    for name, (module, _) in COMMANDS.items():
        assert module.startswith("jaxmamba.cli."), (name, module)
        path = PACKAGE / "cli" / f"{module.rsplit('.', 1)[1]}.py"
        functions = {n.name for n in ast.parse(path.read_text()).body
                     if isinstance(n, ast.FunctionDef)}
        assert {"add_arguments", "run"} <= functions, (name, path)
