"""A sandboxed in-memory file system (tools: tools/files.json): a dict from absolute path to text; directories
exist while they hold a file. Nothing touches the real disk; paths are normalised (".." cannot leave "/") and the
workspace is capped at MAX_BYTES. State: {"files": {"/path": "content"}} (goal paths like "files//docs/a.txt").
Tasks: rename a file, append a line to a list, delete the log files of a directory, copy a value between files.
"""

from __future__ import annotations

import posixpath
import random

from kimi_jax.agentic.environment import Environment, ToolError
from kimi_jax.agentic.tasks import ABSENT, Checkpoint, Rubric, Task, make_agent, task_id, task_rng
from kimi_jax.agentic.tools import TOOLS_DIR, load_tool_file

NAME = "files"
TOOLS = load_tool_file(TOOLS_DIR / "files.json")
MAX_BYTES = 1 << 20
_TODO = ["buy milk", "call the bank", "renew passport", "book flights", "fix the bike", "water plants"]


def normalise(path: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise ToolError(f"path {path!r} must be absolute (start with '/')")
    return posixpath.normpath("/" + path.lstrip("/"))


def make_setup(rng: random.Random) -> dict:
    todo = rng.sample(_TODO, 3)
    files = {"/home/todo.md": "".join(f"- {t}\n" for t in todo),
             "/docs/report.txt": f"Quarterly report\nRevenue: {rng.randint(100, 999)}k\n",
             "/docs/notes.txt": "meeting notes\n",
             "/config/app.ini": f"[server]\nhost = 0.0.0.0\nport = {rng.randint(1024, 9999)}\n"}
    for k in range(rng.randint(1, 3)):
        files[f"/tmp/logs/run{k}.log"] = f"run {k} ok\n"
    files["/tmp/logs/keep.txt"] = "do not delete\n"
    return {"files": files}


class FilesEnv(Environment):
    name = NAME

    def _setup(self, task: Task) -> None:
        self.files = dict(task.setup["files"])

    def _read(self, path: str) -> str:
        if path not in self.files:
            raise ToolError(f"no file {path!r}")
        return self.files[path]

    def _execute(self, name: str, a: dict):
        if name == "list_directory":
            base = normalise(a["path"]).rstrip("/") + "/"
            names = {p[len(base):].split("/")[0] + ("/" if "/" in p[len(base):] else "")
                     for p in self.files if p.startswith(base)}
            if not names:
                raise ToolError(f"no directory {a['path']!r}")
            return {"path": a["path"], "entries": sorted(names)}
        if name == "read_file":
            return {"path": a["path"], "content": self._read(normalise(a["path"]))}
        if name == "write_file":
            path = normalise(a["path"])
            if any(p.startswith(path + "/") for p in self.files):
                raise ToolError(f"{path!r} is a directory")
            content = (self.files.get(path, "") if a.get("mode") == "append" else "") + a["content"]
            if sum(len(v) for p, v in self.files.items() if p != path) + len(content) > MAX_BYTES:
                raise ToolError(f"the workspace is limited to {MAX_BYTES} bytes")
            self.files[path] = content
            return {"path": path, "bytes": len(content)}
        if name == "move_path":
            source, destination = normalise(a["source"]), normalise(a["destination"])
            content = self._read(source)
            if destination in self.files:
                raise ToolError(f"destination {destination!r} exists")
            del self.files[source]
            self.files[destination] = content
            return {"moved": source, "to": destination}
        if name == "delete_path":
            path = normalise(a["path"])
            self._read(path)
            del self.files[path]
            return {"deleted": path}
        raise ToolError(f"tool {name!r} is not available in the {NAME} environment")

    def state(self) -> dict:
        return {"files": dict(self.files)}


def make_task(seed: int, index: int) -> Task:
    rng = task_rng(seed, index, NAME)
    setup = make_setup(rng)
    files = setup["files"]
    agent = make_agent("file system", TOOLS, rng)
    tid = task_id(NAME, seed, index)
    kind = rng.choice(["rename", "append", "clean_logs", "copy_port"])
    if kind == "rename":
        src = rng.choice(["/docs/report.txt", "/docs/notes.txt"])
        dst = src.replace(".txt", rng.choice(["_final.txt", "_2026.txt", "_old.txt"]))
        return Task(tid, NAME, agent, f"Rename {src} to {dst}.", setup,
                    {f"files/{src}": ABSENT, f"files/{dst}": files[src]},
                    Rubric((f"{dst} holds what {src} held", f"{src} is gone"), ("move_path",),
                           (Checkpoint("move_path", {"source": src, "destination": dst}, "moved the file"),),
                           (dst,)),
                    ({"name": "list_directory", "arguments": {"path": "/docs"}},
                     {"name": "move_path", "arguments": {"source": src, "destination": dst}}),
                    f"Renamed {src} to {dst}.")
    if kind == "append":
        item = rng.choice([t for t in _TODO if f"- {t}\n" not in files["/home/todo.md"]])
        return Task(tid, NAME, agent, f"Add \"{item}\" to the end of my to-do list in /home/todo.md.", setup,
                    {"files//home/todo.md": files["/home/todo.md"] + f"- {item}\n"},
                    Rubric((f"\"- {item}\" is the new last line; the other lines are unchanged",),
                           ("read_file", "write_file"),
                           (Checkpoint("read_file", {"path": "/home/todo.md"}, "read the list's format first"),),
                           (item,)),
                    ({"name": "read_file", "arguments": {"path": "/home/todo.md"}},
                     {"name": "write_file", "arguments": {"path": "/home/todo.md", "content": f"- {item}\n",
                                                          "mode": "append"}}),
                    f"Added \"{item}\" to /home/todo.md.")
    if kind == "clean_logs":
        logs = sorted(p for p in files if p.endswith(".log"))
        return Task(tid, NAME, agent, "Delete every .log file in /tmp/logs, and nothing else.", setup,
                    {**{f"files/{p}": ABSENT for p in logs}, "files//tmp/logs/keep.txt": "do not delete\n"},
                    Rubric((f"the {len(logs)} log files are deleted", "keep.txt is untouched"),
                           ("list_directory", "delete_path"),
                           (Checkpoint("list_directory", {"path": "/tmp/logs"}, "listed the directory"),)
                           + tuple(Checkpoint("delete_path", {"path": p}, f"deleted {p}") for p in logs),
                           (str(len(logs)),)),
                    ({"name": "list_directory", "arguments": {"path": "/tmp/logs"}},)
                    + tuple({"name": "delete_path", "arguments": {"path": p}} for p in logs),
                    f"Deleted {len(logs)} log files from /tmp/logs.")
    port = files["/config/app.ini"].split("port = ")[1].strip()
    return Task(tid, NAME, agent, "Write the port number from /config/app.ini into /config/port.txt (just the "
                "number).", setup, {"files//config/port.txt": port, "files//config/app.ini": files["/config/app.ini"]},
                Rubric((f"/config/port.txt holds {port}",), ("read_file", "write_file"),
                       (Checkpoint("write_file", {"path": "/config/port.txt", "content": port}, "wrote the port"),),
                       (port,)),
                ({"name": "read_file", "arguments": {"path": "/config/app.ini"}},
                 {"name": "write_file", "arguments": {"path": "/config/port.txt", "content": port}}),
                f"Wrote port {port} to /config/port.txt.")
