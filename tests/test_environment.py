"""environment.yml, settings.ini, README and .ci/run agree with each other."""
import re, configparser, shlex
from pathlib import Path
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from conftest import ROOT

def _settings():
    c = configparser.ConfigParser(delimiters=['=']); c.read(ROOT/'settings.ini')
    return c['DEFAULT']

def _reqs(s): return {Requirement(r).name.lower(): Requirement(r) for r in shlex.split(s)}

def test_environment_yml_matches_settings():
    s = _settings()
    want = {**_reqs(s['requirements']), **_reqs(s['dev_requirements'])}
    env = yaml.safe_load((ROOT/'environment.yml').read_text())
    deps = env['dependencies']
    py = next(d for d in deps if isinstance(d, str) and d.startswith('python'))
    assert Version(py.split('=')[-1]) >= Version(s['min_python']), f"{py} is older than min_python {s['min_python']}"
    assert 'pip' in deps
    pip = next(d['pip'] for d in deps if isinstance(d, dict))
    assert '-e .[dev]' in pip, "environment.yml must install the checkout itself with -e .[dev]"
    got = {Requirement(r).name.lower(): Requirement(r) for r in pip if not r.startswith('-')}
    # torch is pinned to the CPU wheel that a fresh environment should take; it must satisfy settings.ini's range
    torch_pin = got.pop('torch')
    assert torch_pin.specifier == Requirement('torch==2.13.0').specifier
    assert want['torch'].specifier.contains('2.13.0')
    missing = sorted(set(want) - set(got) - {'torch'}); extra = sorted(set(got) - set(want))
    assert not missing and not extra, f"environment.yml vs settings.ini: missing {missing}, extra {extra}"
    for name, r in got.items():
        assert r.specifier == want[name].specifier, f"{name}: environment.yml has {r}, settings.ini has {want[name]}"

def _quickstart():
    text = (ROOT/'README.md').read_text()
    sec = text.split('## Quickstart', 1)[1].split('\n## ', 1)[0]
    return re.findall(r'```(?:bash|sh)?\n(.*?)\n```', sec, flags=re.S)

def test_readme_has_two_quickstart_commands_and_ci_runs_b_verbatim():
    blocks = _quickstart()
    cmds = [l for b in blocks for l in b.splitlines() if l.strip() and not l.strip().startswith('#')]
    assert len(cmds) == 2, f"Quickstart must hold exactly two commands, found {cmds}"
    ci = (ROOT/'.ci'/'run').read_text()
    assert cmds[1] in ci, ".ci/run must run Quickstart (b) verbatim"
    assert 'train_sft' in cmds[0] and 'pytest' in cmds[1]

def test_runs_folder_tracks_only_gitkeep():
    gi = (ROOT/'.gitignore').read_text().splitlines()
    assert 'runs/*' in gi and '!runs/.gitkeep' in gi
    assert (ROOT/'runs'/'.gitkeep').exists()
