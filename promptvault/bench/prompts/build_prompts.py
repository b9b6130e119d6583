"""Rebuild prompts.json: `python build_prompts.py prompts.json` (Debian license texts, CPython sources).

Kept for provenance; the shipped prompts.json was built with CPython 3.11.7 on Debian 12."""
import inspect, json, importlib, sys, textwrap, re
from pathlib import Path

CHARS = 10500
out = []
def chunks(text, n, size=CHARS):
    # cut at paragraph/line boundaries
    res = []; pos = 0
    while len(res) < n and pos < len(text):
        end = min(len(text), pos + size)
        if end < len(text):
            nl = text.rfind("\n", pos + size - 600, end)
            if nl > pos: end = nl + 1
        res.append(text[pos:end]); pos = end
    return res

lic = Path("/usr/share/common-licenses")
prose_plan = [("GPL-3", 3), ("GPL-2", 1), ("LGPL-2.1", 2), ("GFDL-1.3", 2), ("MPL-2.0", 1), ("MPL-1.1", 1)]
for name, n in prose_plan:
    text = (lic / name).read_text()
    for i, c in enumerate(chunks(text, n)):
        if len(c) < CHARS * 0.9: continue
        out.append({"id": f"prose-{name.lower()}-{i}", "kind": "prose", "source": f"/usr/share/common-licenses/{name}",
                    "license": f"{name} text (verbatim copying permitted)", "text": c})
code_plan = ["textwrap", "heapq", "fractions", "shlex", "difflib", "argparse", "string", "calendar"]
for mod in code_plan:
    m = importlib.import_module(mod)
    src = inspect.getsource(m)
    # skip the license/header and start at a clean line
    start = src.find("\n", len(src) // 5) + 1 if mod in ("argparse", "difflib") else 0
    c = chunks(src[start:], 1)[0]
    out.append({"id": f"code-{mod}", "kind": "code", "source": f"CPython {sys.version.split()[0]} Lib/{mod}.py",
                "license": "PSF-2.0", "text": c})
# chat: questions about stdlib functions, answered with their real docstrings
chat_plan = {
    "subprocess": ["run", "Popen", "check_output", "call", "check_call", "getoutput", "list2cmdline", "CompletedProcess", "TimeoutExpired"],
    "json": ["dumps", "loads", "dump", "load", "JSONEncoder", "JSONDecoder"],
    "shutil": ["copyfile", "copy", "copy2", "copytree", "rmtree", "move", "which", "disk_usage", "make_archive", "unpack_archive", "chown", "copymode", "copystat", "ignore_patterns"],
    "os": ["walk", "makedirs", "removedirs", "renames", "fwalk", "get_exec_path", "popen", "fdopen", "execvpe", "getenv", "putenv" ],
    "collections": ["namedtuple", "OrderedDict", "Counter", "ChainMap", "UserDict", "defaultdict", "deque"],
    "functools": ["lru_cache", "wraps", "update_wrapper", "total_ordering", "cmp_to_key", "partial", "reduce", "singledispatch", "cached_property", "partialmethod"],
    "tarfile": ["open", "TarFile", "TarInfo", "is_tarfile"],
}

docs = []
extra = {"logging": ["basicConfig", "Logger", "Handler", "Formatter", "LoggerAdapter", "getLogger", "FileHandler", "StreamHandler", "LogRecord", "Filter", "captureWarnings"],
         "zipfile": ["ZipFile", "ZipInfo", "is_zipfile", "PyZipFile", "Path"],
         "pathlib": ["Path", "PurePath", "PurePosixPath", "PureWindowsPath"],
         "argparse": ["ArgumentParser", "Action", "FileType", "Namespace", "HelpFormatter"],
         "threading": ["Thread", "Lock", "RLock", "Condition", "Semaphore", "Event", "Timer", "Barrier", "local"],
         "inspect": ["getmembers", "signature", "getsource", "getfullargspec", "cleandoc", "getattr_static", "unwrap", "isawaitable"]}
chat_plan.update(extra)
for mod, names in chat_plan.items():
    m = importlib.import_module(mod)
    for nm in names:
        doc = inspect.getdoc(getattr(m, nm)) or ""
        if len(doc) >= 150:
            docs.append((f"{mod}.{nm}", doc))
conv = 0; i = 0
while i < len(docs):
    msgs = [{"role": "system", "content": "You are a helpful assistant who knows the Python standard library well."}]
    total = 0; mods = []
    while i < len(docs) and total < CHARS:
        name, doc = docs[i]; i += 1
        msgs.append({"role": "user", "content": f"What does {name} do, and how do I use it?"})
        msgs.append({"role": "assistant", "content": doc})
        total += len(doc) + 60; mods.append(name)
    if total < CHARS: break
    out.append({"id": f"chat-{conv}", "kind": "chat", "source": f"CPython {sys.version.split()[0]} docstrings of " + ", ".join(mods),
                "license": "PSF-2.0", "messages": msgs, "chars": total})
    conv += 1
for o in out: print(o["id"], len(o.get("text", "")) or o.get("chars"), len(o.get("messages", [])))
Path(sys.argv[1]).write_text(json.dumps({"version": 1, "prompts": out}, indent=0, ensure_ascii=False))
print(len(out))
