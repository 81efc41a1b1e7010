"""Adversarial tests of the code sandbox (llmwb.sandbox): each completion attacks, and each case checks that the effect
outside did not happen and that the completion scores 0. Real processes, sockets, signals, files and bubblewrap; no mocks.
CI installs bubblewrap (.ci/run), so none of this is skipped there."""
import os, sys, json, time, socket, signal, textwrap, subprocess, threading, resource, shutil
from pathlib import Path
import pytest
from conftest import run_cli

from llmwb.sandbox import run_sandboxed, run_many, score_code, sandbox_status, require_sandbox, SandboxUnavailableError, _run
from llmwb.fixtures import CODE_TASKS, code_solution

TESTS = textwrap.dedent('''
    import unittest
    class TestCases(unittest.TestCase):
        def test_small(self): self.assertEqual(task_func([1, 2]), 5)
        def test_empty(self): self.assertEqual(task_func([]), 0)
        def test_negative(self): self.assertEqual(task_func([-3]), 9)
''')
GOOD = 'def task_func(xs):\n    return sum(x * x for x in xs)\n'
WRONG = 'def task_func(xs):\n    return 0\n'

def score(code, tests=TESTS, **kw) -> float:
    "The code reward of a completion with run_tests: 1 when every test of the row ran and passed in the sandbox, else 0."
    return score_code([code], ['task_func'], [tests], run_tests=True, **kw)[0].score

@pytest.fixture
def target(tmp_path):
    "A world-writable folder outside the sandbox, holding a file and a subfolder that must survive untouched."
    d = tmp_path/'outside'; (d/'sub').mkdir(parents=True)
    (d/'keep.txt').write_text('precious'); (d/'sub'/'inner.txt').write_text('inner')
    for p in (d, d/'sub'): p.chmod(0o777)
    for p in (d/'keep.txt', d/'sub'/'inner.txt'): p.chmod(0o666)
    tmp_path.chmod(0o755)
    return d

def untouched(d:Path, extra=()) -> bool:
    names = sorted(p.name for p in d.iterdir())
    return (names == sorted(['keep.txt', 'sub', *extra]) and (d/'keep.txt').read_text() == 'precious'
            and (d/'keep.txt').stat().st_mode & 0o777 == 0o666 and (d/'sub'/'inner.txt').read_text() == 'inner')

def attack(body:str, fn:str=WRONG, guard:bool=False, **names) -> str:
    "A completion: `names` bound, the attack at import time (with `guard`, its exceptions printed, not raised), then a wrong solution."
    body = textwrap.dedent(body)
    if guard: body = 'try:\n' + textwrap.indent(body, '    ') + "\nexcept Exception as e: print('refused', type(e).__name__, e)"
    return ''.join(f'{k} = {v!r}\n' for k, v in names.items()) + body + '\n' + fn

def test_honest_solutions():
    "Correct solutions score 1, numpy, pandas, matplotlib and unittest.mock included; wrong ones 0."
    assert score(GOOD) == 1.0 and score(WRONG) == 0.0
    np_good = 'import numpy as np\ndef task_func(xs):\n    return int(np.square(np.asarray(xs, dtype=np.int64)).sum())\n'
    assert score(np_good) == 1.0
    libs = {lib for t in CODE_TASKS for lib in json.loads(t['libs'])}
    assert {'numpy', 'pandas', 'matplotlib'} <= libs and any('unittest.mock' in t['test'] for t in CODE_TASKS)
    got = score_code([code_solution(t, wrong) for wrong in (False, True) for t in CODE_TASKS], ['task_func'] * 16,
                     [t['test'] for t in CODE_TASKS] * 2, run_tests=True)
    assert [g.score for g in got] == [1.0] * 8 + [0.0] * 8, [g.reason for g in got]

def test_completions_that_cannot_be_code_score_zero():
    "Nothing a completion holds makes scoring raise: oversized, NUL, nested past the parser, unencodable, undecodable output."
    odd = ['def task_func(xs):\x00\n    return 1', 'x = ' + '-' * 6000 + '1\n' + GOOD, 'x = ' + '[' * 1000 + ']' * 1000 + '\n' + GOOD,
           GOOD + '# \udcff\n', GOOD + ' ' * 30_000, "import sys\nsys.stdout.buffer.write(b'\\xff\\xfe\\x00')\n" + WRONG]
    got = score_code(odd, ['task_func'] * len(odd), [TESTS] * len(odd), run_tests=True, max_code_chars=20_000)
    assert [g.score for g in got] == [0.0] * len(odd), [(g.score, g.reason) for g in got]
    print([g.reason for g in got])
    from llmwb.grpo import code_reward     # the reward GRPO calls, on the same completions
    assert code_reward(odd, entry_point=['task_func'] * len(odd), test=[TESTS] * len(odd), run_tests=True) == [0.0] * len(odd)

WRITES = {
    'open_w': "open(T + '/a.txt', 'w').write('x')",
    'os_open_dir_fd': "import os\nfd = os.open(T, os.O_RDONLY)\nos.write(os.open('b.txt', os.O_CREAT | os.O_WRONLY, dir_fd=fd), b'x')",
    'rename_onto': "import os\nopen('/tmp/x', 'w').write('evil')\nos.replace('/tmp/x', T + '/keep.txt')",
    'hard_link': "import os\nos.link(T + '/keep.txt', '/tmp/l')\nopen('/tmp/l', 'w').write('evil')",
    'filio_pathlib': "import io, pathlib\nio.FileIO(pathlib.Path(T) / 'c.txt', 'w').write(b'x')",
    'truncate': "import os\nos.truncate(T + '/keep.txt', 0)",
    'symlink_write': "import os\nos.symlink(T + '/keep.txt', '/tmp/s')\nopen('/tmp/s', 'w').write('evil')",
    'sqlite': "import sqlite3\nsqlite3.connect(T + '/db.sqlite').execute('create table t (x)')",
    'rmtree': "import shutil, pathlib\nshutil.rmtree(pathlib.Path(T) / 'sub')",
    'remove': "import os\nos.remove(T + '/keep.txt')",
    'chmod': "import os\nos.chmod(T + '/keep.txt', 0)",
    'mkdir': "import os\nos.mkdir(T + '/newdir')",
    'proc_root': "open('/proc/1/root' + T + '/d.txt', 'w').write('x')",
    'shell': "import os\nos.system('echo x > ' + T + '/e.txt; rm -f ' + T + '/keep.txt')",
}

@pytest.mark.parametrize('route', sorted(WRITES))
def test_writes_and_removals_stay_inside(route, target):
    code = attack(WRITES[route], guard=True, T=str(target))
    assert score(code) == 0.0
    assert untouched(target)

def host_processes(token:str) -> list[int]:
    "Processes on this machine whose command line holds `token`."
    out = []
    for p in Path('/proc').iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid(): continue
        try: cmd = (p/'cmdline').read_bytes()
        except OSError: continue
        if token.encode() in cmd: out.append(int(p.name))
    return out

PROCS = {
    'subprocess_daemon': "import subprocess\nsubprocess.Popen(['sh', '-c', 'echo x > ' + T + '/p.txt; exec sleep 300 ' + TOKEN], start_new_session=True)",
    'posixsubprocess': "import _posixsubprocess, os\nr, w = os.pipe()\n_posixsubprocess.fork_exec([b'/bin/sh', b'-c', ('touch ' + T + '/q; sleep 300 ' + TOKEN).encode()], [b'/bin/sh'], True, (), None, None, -1, -1, -1, -1, -1, -1, r, w, True, True, None, None, None, -1, None, False)",
    'multiprocessing_spawn': "import multiprocessing as mp, time\ndef child(): open(T + '/m.txt', 'w').write('x'); time.sleep(300)\nif True:\n    ctx = mp.get_context('spawn'); p = ctx.Process(target=child, daemon=False); p.start(); time.sleep(1)",
    'fork_exec': "import os\nif os.fork() == 0:\n    os.setsid()\n    os.execv('/bin/sh', ['/bin/sh', '-c', 'touch ' + T + '/f; sleep 300 ' + TOKEN])",
    'posix_spawn': "import os\nos.posix_spawn('/bin/sh', ['/bin/sh', '-c', 'touch ' + T + '/g; sleep 300 ' + TOKEN], {})",
    'double_fork_daemon': "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        os.execv('/bin/sleep', ['sleep', '300', TOKEN])\n    os._exit(0)\ntime.sleep(0.5)",
}

@pytest.mark.parametrize('route', sorted(PROCS))
def test_processes_stay_inside_and_die(route, target):
    token = f'llmwb-token-{route}-{os.getpid()}'
    code = attack(PROCS[route], guard=True, T=str(target), TOKEN=token)
    assert score(code, timeout=10) == 0.0
    assert untouched(target)
    assert host_processes(token) == []

@pytest.fixture
def servers(tmp_path):
    "A TCP and a UDP server on 127.0.0.1, and a UNIX socket (path and abstract), recording what reaches them."
    got = []
    tcp = socket.socket(); tcp.bind(('127.0.0.1', 0)); tcp.listen(); tcp.settimeout(0.2)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); udp.bind(('127.0.0.1', 0)); udp.settimeout(0.2)
    path = str(tmp_path/'s.sock'); unx = socket.socket(socket.AF_UNIX); unx.bind(path); os.chmod(path, 0o777); unx.listen(); unx.settimeout(0.2)
    abstract = f'\0llmwb-test-{os.getpid()}'; abs_ = socket.socket(socket.AF_UNIX); abs_.bind(abstract); abs_.listen(); abs_.settimeout(0.2)
    stop = threading.Event()
    def serve():
        while not stop.is_set():
            for s in (tcp, unx, abs_):
                try: c, _ = s.accept(); got.append(s); c.close()
                except OSError: pass
            try: udp.recvfrom(100); got.append(udp)
            except OSError: pass
    t = threading.Thread(target=serve, daemon=True); t.start()
    yield {'tcp': tcp.getsockname()[1], 'udp': udp.getsockname()[1], 'unix': path, 'abstract': abstract, 'got': got}
    stop.set(); t.join()
    for s in (tcp, udp, unx, abs_): s.close()

NETWORK = {
    'tcp_loopback': "import socket\nsocket.create_connection(('127.0.0.1', S['tcp']), timeout=2)",
    'udp_loopback': "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', S['udp']))",
    'unix_path': "import socket\nsocket.socket(socket.AF_UNIX).connect(S['unix'])",
    'unix_abstract': "import socket\nsocket.socket(socket.AF_UNIX).connect(S['abstract'])",
    'outside_world': "import urllib.request\nurllib.request.urlopen('http://1.1.1.1', timeout=2)",
}

@pytest.mark.parametrize('route', sorted(NETWORK))
def test_no_network(route, servers):
    s = {k: v for k, v in servers.items() if k != 'got'}
    code = attack(NETWORK[route] + "\nprint('CONNECTED')", guard=True, S=s)
    r = run_sandboxed(code, TESTS)
    time.sleep(0.5)
    assert not r.ok and servers['got'] == []
    assert route == 'udp_loopback' or 'CONNECTED' not in r.output    # a datagram leaves without an answer: only the receiver can tell

def test_native_code(target, servers, tmp_path):
    "ctypes into libc (system, raw syscalls), a shared library the completion brings, and new namespaces: nothing reaches outside."
    cases = [
        f"import ctypes\nctypes.CDLL(None).system(b'touch {target}/n1; echo x > {target}/keep.txt')",
        f"import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\nfd = libc.syscall(257, -100, b'{target}/n2', os.O_CREAT | os.O_WRONLY, 0o666)\nprint('fd', fd, ctypes.get_errno())",
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint('unshare', libc.unshare(0x10000000 | 0x20000), ctypes.get_errno())\nprint('mount', libc.mount(b'none', b'/tmp', b'tmpfs', 0, None))",
        "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nprint('io_uring', libc.syscall(425, 8, ctypes.create_string_buffer(120)), 'bpf', libc.syscall(321, 0, None, 0), 'ptrace', libc.ptrace(16, 1, 0, 0))",
    ]
    cc = shutil.which('gcc') or shutil.which('cc')
    if cc:
        src = tmp_path/'evil.c'
        src.write_text(f'''#include <stdio.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>
__attribute__((constructor)) static void evil(void) {{
    FILE *f = fopen("{target}/so.txt", "w"); if (f) {{ fputs("x", f); fclose(f); }}
    int s = socket(AF_INET, SOCK_STREAM, 0); struct sockaddr_in a = {{0}};
    a.sin_family = AF_INET; a.sin_port = htons({servers['tcp']}); a.sin_addr.s_addr = inet_addr("127.0.0.1");
    connect(s, (struct sockaddr *)&a, sizeof a);
}}''')
        subprocess.run([cc, '-shared', '-fPIC', '-o', str(tmp_path/'evil.so'), str(src)], check=True)
        blob = (tmp_path/'evil.so').read_bytes()
        cases.append(f"import ctypes\nopen('/tmp/evil.so', 'wb').write({blob!r})\nctypes.CDLL('/tmp/evil.so')")
    for body in cases:
        r = run_sandboxed(attack(body, guard=True), TESTS)
        assert not r.ok, body
        assert untouched(target), body
    time.sleep(0.5)
    assert servers['got'] == []
    assert 'unshare -1 1' in run_sandboxed(cases[2]).output    # EPERM from the seccomp filter

def test_runner_and_limits_tampering():
    hacks = {
        'raise_cpu_limit': "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (resource.RLIM_INFINITY,) * 2)",
        'kill_supervisor': "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
        'kill_everything': "import os, signal\nos.kill(-1, signal.SIGKILL)",
        'close_fds': "import os\nos.closerange(3, 4096)",
        'forge_events': "import os, json\nfor fd in range(3, 64):\n    try: os.write(fd, b'{\"e\": \"loaded\"}\\n{\"e\": \"done\"}\\n')\n    except OSError: pass",
        'forge_verdict_stdout': "import json\nprint('S' + json.dumps({'secret': 'x', 'loaded': True, 'done': True, 'run': [], 'passed': []}))",
        'read_supervisor': "import os\nprint(open(f'/proc/{os.getppid()}/mem', 'rb').read(10))",
        'prlimit_supervisor': "import resource, os\nresource.prlimit(os.getppid(), resource.RLIMIT_NOFILE, (3, 3))",
    }
    for name, body in hacks.items():
        assert score(attack(body, guard=True)) == 0.0, name
    # a correct solution that also raises its CPU limit still ends at the limit when it loops
    r = run_sandboxed(GOOD + "\nimport resource\ntry: resource.setrlimit(resource.RLIMIT_CPU, (100, 100))\nexcept Exception as e: print(e)\nwhile True: pass\n",
                      TESTS, cpu_seconds=1, timeout=20)
    assert not r.ok and 'CPU time limit' in r.reason and not r.timed_out, r

def rss_mb() -> float:
    "This process's peak resident memory (VmHWM) in MB."
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) / 1024

def test_resource_exhaustion():
    t0 = time.monotonic()
    r = run_sandboxed('while True: pass\n' + WRONG, TESTS, cpu_seconds=1, timeout=20)
    assert not r.ok and 'CPU time limit' in r.reason, r
    assert time.monotonic() - t0 < 10
    r = run_sandboxed('x = bytearray(8 << 30)\n' + GOOD, TESTS, memory_mb=1024)
    assert not r.ok and 'MemoryError' in r.reason, r
    r = run_sandboxed('import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(1000)\n' + GOOD, TESTS, timeout=2)
    assert not r.ok and r.timed_out and r.wall_s < 4, r
    token = f'llmwb-forkbomb-{os.getpid()}'
    bomb = f"import os\nwhile True:\n    try:\n        if os.fork() == 0: os.execv('/bin/sleep', ['sleep', '300', {token!r}])\n    except OSError: pass\n"
    r = run_sandboxed(bomb, TESTS, timeout=5)
    assert not r.ok and r.timed_out and r.wall_s < 8, r
    assert host_processes(token) == []          # every process it started is gone when the call returns
    r = run_sandboxed("import os\nfd = os.open('/tmp/big', os.O_CREAT | os.O_WRONLY)\nos.posix_fallocate(fd, 0, 4 << 30)\n" + GOOD, TESTS)
    assert not r.ok and ('No space' in r.reason or 'File too large' in r.reason), r
    r = run_sandboxed("open('/dev/shm/big', 'wb').write(b'x' * (64 << 20))\n" + GOOD, TESTS)
    assert not r.ok, r

def test_output_flood_is_drained():
    "A completion that prints 1 GiB: the trainer keeps the last 64 KB and grows by less than 50 MB."
    Path('/proc/self/clear_refs').write_text('5')     # start the peak (VmHWM) from the current size
    before = rss_mb()
    t0 = time.monotonic()
    r = run_sandboxed("import sys\nb = b'x' * (1 << 20)\nfor _ in range(1024): sys.stdout.buffer.write(b)\n" + WRONG, TESTS, timeout=60)
    print(f'1 GiB flood: {time.monotonic() - t0:.1f}s, trainer peak RSS +{rss_mb() - before:.1f} MB, kept {len(r.output)} chars')
    assert rss_mb() - before < 50 and len(r.output) <= 65536 and not r.ok

def test_parent_is_out_of_reach(monkeypatch):
    monkeypatch.setenv('LLMWB_TEST_SECRET', 'hunter2-token')
    sentinel = subprocess.Popen(['sleep', '60'])
    me = os.getpid()
    body = f"""
import os, signal, resource, ctypes
for pid in ({me}, {sentinel.pid}, 1, os.getppid()):
    for f in (lambda: os.kill(pid, signal.SIGKILL), lambda: resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, 3)),
              lambda: print(open(f'/proc/{{pid}}/environ', 'rb').read()), lambda: print(open(f'/proc/{{pid}}/mem', 'rb').read(16)),
              lambda: signal.pidfd_send_signal(os.pidfd_open(pid), signal.SIGKILL)):
        try: f()
        except Exception as e: print('refused', type(e).__name__)
print(dict(os.environ))
"""
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    r = run_sandboxed(attack(body), TESTS)
    assert not r.ok and 'hunter2' not in r.output
    assert sentinel.poll() is None and resource.getrlimit(resource.RLIMIT_NOFILE) == limits
    sentinel.kill()

HACKS = {
    'sys_exit_at_import': "import sys\nsys.exit(0)",
    'os_exit_at_import': "import os\nos._exit(0)",
    'sys_exit_in_function': None,
    'os_exit_in_function': None,
    'atexit': "import atexit, os\natexit.register(lambda: os._exit(0))",
    'patch_assertEqual': "import unittest\nunittest.TestCase.assertEqual = lambda *a, **k: None",
    'patch_wasSuccessful': "import unittest\nunittest.TestResult.wasSuccessful = lambda self: True",
    'patch_TestCase_run': "import unittest\nunittest.TestCase.run = lambda self, result=None: None",
    'patch_addFailure': "import unittest\nunittest.TestResult.addFailure = lambda *a: None\nunittest.TestResult.addError = lambda *a: None",
    'patch_unittest_main': "import unittest, sys\nunittest.main = lambda *a, **k: sys.exit(0)",
    'skip_at_import': "import unittest\nraise unittest.SkipTest('no')",
    'skip_in_function': None,
    'read_tests': "import os, gc, sys\nfound = [o for o in gc.get_objects() if isinstance(o, str) and 'TestCases' in o]\nfor p in ['/proc/self/cmdline', f'/proc/{os.getppid()}/cmdline', f'/proc/{os.getppid()}/environ', '/proc/1/cmdline']:\n    try: found.append(open(p, 'rb').read().decode('latin1'))\n    except OSError: pass\nprint('LEAK' if any('TestCases' in f or 'test_negative' in f for f in found) else 'nothing')",
    'always_equal': None,
    'fake_unittest_module': "import sys, types\nfake = types.ModuleType('unittest')\nclass TestCase:\n    def __init_subclass__(cls, **k): pass\nfake.TestCase = TestCase\nsys.modules['unittest'] = fake",
    'patch_import': "import builtins\n_imp = builtins.__import__\nbuiltins.__import__ = lambda name, *a, **k: _imp('os' if name == 'unittest' else name, *a, **k)",
    'keyboard_interrupt': None,
    'should_stop': None,
    'print_fake_success': "print('Ran 3 tests in 0.001s\\n\\nOK')\nprint('{\"loaded\": true, \"done\": true}')",
    'settrace': "import sys\ndef tr(frame, event, arg):\n    return None\nsys.settrace(tr)",
    'patch_numpy_testing': "import numpy.testing\nnumpy.testing.assert_array_equal = lambda *a, **k: None",
}
IN_FUNCTION = {
    'sys_exit_in_function': "def task_func(xs):\n    import sys; sys.exit(0)\n",
    'os_exit_in_function': "def task_func(xs):\n    import os; os._exit(0)\n",
    'skip_in_function': "def task_func(xs):\n    import unittest; raise unittest.SkipTest('skip')\n",
    'always_equal': "class AE:\n    def __eq__(self, o): return True\n    def __ne__(self, o): return False\ndef task_func(xs):\n    return AE()\n",
    'keyboard_interrupt': "def task_func(xs):\n    raise KeyboardInterrupt\n",
    'should_stop': "def task_func(xs):\n    import unittest.case; raise unittest.case._ShouldStop\n",
}

@pytest.mark.parametrize('name', sorted(HACKS))
def test_reward_hacks_score_zero(name):
    code = IN_FUNCTION[name] if HACKS[name] is None else attack(HACKS[name])
    r = run_sandboxed(code, TESTS)
    assert not r.ok and 'LEAK' not in r.output, r

def test_assert_true_of_always_equal():
    tests = 'import unittest\nclass TestCases(unittest.TestCase):\n    def test_a(self): self.assertTrue(task_func([1, 2]) == 5)\n'
    r = run_sandboxed("class AE(int):\n    __eq__ = lambda s, o: True\ndef task_func(xs):\n    return AE(0)\n", tests)
    assert not r.ok, r
    r = run_sandboxed("class AE:\n    __eq__ = slice\ndef task_func(xs):\n    return AE()\n", TESTS)
    assert not r.ok, r
    # the completion's own dataclass is compared field by field: fine
    tests = 'import unittest\nclass TestCases(unittest.TestCase):\n    def test_a(self): self.assertEqual(task_func(1), P(1, 2))\n'
    assert run_sandboxed("from dataclasses import dataclass\n@dataclass\nclass P:\n    x: int\n    y: int\ndef task_func(x):\n    return P(x, 2)\n", tests).ok

def test_4gib_fallocate_fails_inside():
    r = run_sandboxed("import os\nfd = os.open('/tmp/big', os.O_CREAT | os.O_WRONLY)\nos.posix_fallocate(fd, 0, 4 << 30)\nprint('ALLOCATED')")
    assert not r.ok and 'ALLOCATED' not in r.output and ('No space left' in r.reason or 'File too large' in r.reason), r

def test_both_namespace_modes():
    "As root the sandbox drops to its own uid; the user-namespace mode (what a non-root trainer gets) holds the same line."
    status = require_sandbox()
    modes = [status.mode] + (['user'] if os.geteuid() == 0 else [])
    for mode in modes:
        r = _run('import os\nprint(os.getuid(), os.getgid())', None, mode, status.bwrap)
        uid = int(r.output.split()[0])
        assert r.ok and uid != 0, (mode, r)
        if mode == 'root': assert uid >= 2_000_000_000      # a uid of its own, outside the host's accounts
        r = _run(attack("try: open('/proc/1/root/etc/llmwb-escape', 'w').write('x')\nexcept OSError as e: print('refused', e)\n"
                        "import os\nprint('userns', os.unshare(0x10000000) if hasattr(os, 'unshare') else None)"),
                 TESTS, mode, status.bwrap, limits={})
        assert not r.ok and not os.path.exists('/etc/llmwb-escape'), (mode, r)

def test_concurrent_runs_are_isolated_from_each_other():
    "Concurrent sandboxes share nothing: each sees its own /tmp, and a fork bomb in one leaves the others' verdicts alone."
    bomb = 'import os\nwhile True:\n    try: os.fork()\n    except OSError: pass\n'
    probe = "import os, time\nopen('/tmp/mine', 'w').write(str(os.getpid()))\ntime.sleep(0.3)\nprint(sorted(os.listdir('/tmp')))\n" + GOOD
    rs = run_many([(bomb, None)] + [(probe, TESTS)] * 3, workers=4, timeout=4)
    assert not rs[0].ok and all(r.ok for r in rs[1:]), [r.reason for r in rs]
    assert all(r.output.strip().endswith("['mine']") for r in rs[1:])

def test_no_bubblewrap_is_refused(tmp_path, monkeypatch):
    "Without bwrap on PATH, run_tests is refused with the fix; scoring without tests still works; nothing runs unisolated."
    empty = tmp_path/'empty'; empty.mkdir()
    monkeypatch.setenv('PATH', str(empty))
    assert not sandbox_status().ok
    with pytest.raises(SandboxUnavailableError, match='apt-get install bubblewrap'): require_sandbox()
    with pytest.raises(SandboxUnavailableError): score_code([GOOD], ['task_func'], [TESTS], run_tests=True)
    assert score_code([GOOD], ['task_func'], [TESTS])[0].score == 1.0

def test_grpo_refuses_run_tests_without_bubblewrap(runs_dir, mirror, tmp_path):
    "llmwb grpo --run_tests with no bwrap on PATH: one clear message, exit 2, no run folder."
    empty = tmp_path/'empty'; empty.mkdir()
    r = run_cli('grpo', '--dataset', 'bigcodebench', '--data_dir', str(mirror), '--run_tests', 'True', '--max_steps', '1',
                '--batch_size', '8', '--grpo_group_size', '4', env={'PATH': str(empty), 'HF_HUB_OFFLINE': '1'})
    assert r.returncode == 2, r.stderr[-3000:]
    assert 'bubblewrap' in r.stderr and 'apt-get install bubblewrap' in r.stderr and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert not list(runs_dir.iterdir())

def test_nothing_of_the_host_is_visible(runs_dir, cache_dir, tmp_path):
    "The project, $HOME (but the path to an interpreter inside it), run folders, caches and the host /tmp are not there."
    from conftest import ROOT
    from llmwb.sandbox import python_roots
    (tmp_path/'host-file').write_text('x'); cache_dir.mkdir(parents=True, exist_ok=True)
    home = Path.home()
    places = [str(ROOT), str(ROOT/'llmwb'), str(runs_dir), str(cache_dir), str(tmp_path/'host-file')]
    r = run_sandboxed(f"import os, json\nh = {str(home)!r}\nprint(json.dumps([[p for p in {places!r} if os.path.exists(p)], "
                      "os.listdir(h) if os.path.isdir(h) else [], os.listdir('/tmp'), sorted(os.environ)]))")
    assert r.ok, r
    seen, home_listing, tmp_listing, env = json.loads(r.output)
    on_the_way = {Path(p).relative_to(home).parts[0] for p in python_roots() if Path(p).is_relative_to(home)}
    assert seen == [] and set(home_listing) <= on_the_way and not any(n.startswith('pytest') for n in tmp_listing), r.output
    assert os.environ.get('LLMWB_RUNS_DIR') and 'LLMWB_RUNS_DIR' not in env, env
