"""The engine in a separate Python process: started, followed and stopped from Slicer's main thread.

Why a process and not a thread: Slicer's main thread holds Python's lock while it is idle
(PythonQt's thread support is off in Slicer), so a Python worker thread advances only while the main
thread happens to run Python; a registration that takes 5 s from the command line took 87 s in
such a thread. A process has its own interpreter, and ending it ends the run at once.

Inside Slicer the process is ``PythonSlicer`` (Slicer's Python with its packages, PyTorch from the
PyTorch extension), found from Slicer's own paths; elsewhere (tests, scripts on slicer-core) it is
this interpreter. No shell is involved, on Windows, macOS and Linux alike. Everything the process
reads and writes lies in a private temporary folder, removed whatever happens. Its output goes to a
file in that folder (not a pipe): reading it never blocks, so :meth:`EngineProcess.poll` is safe to
call from a GUI timer.

PythonSlicer is a launcher that starts the real interpreter as its child; stopping only the
launcher would leave the child running, so the whole process tree is ended (a process group on
POSIX, ``taskkill /T`` on Windows). Should Slicer itself die, the engine notices (it watches its
owner's process id) and ends, removing its folder; folders of owners that are gone are also
removed by the next run.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

#: Runs ``fmsam.worker`` with the engine's folder (argument 1) on the path; argument 2: the request.
_WORKER_CODE = ("import sys; sys.path.insert(0, sys.argv[1]); from fmsam.worker import main; "
                "main(sys.argv[2:])")
_CREATE_NO_WINDOW = 0x08000000  # Windows: no console window for the process
#: Private folders are named ``FMSAMRegistration-<owner pid>-<random>`` in the temporary folder.
FOLDER_PREFIX = "FMSAMRegistration-"
_FOLDER = re.compile(r"^%s(\d+)-" % FOLDER_PREFIX)


def remove_abandoned_folders(parent=None):
    """Remove the private folders whose owner process is gone (a Slicer that crashed or was killed
    while its engine ran); returns their names."""
    from fmsam.processes import process_alive

    parent = parent or tempfile.gettempdir()
    removed = []
    for name in os.listdir(parent):
        match = _FOLDER.match(name)
        if match and not process_alive(int(match.group(1))):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed.append(name)
    return removed


def python_executable():
    """The interpreter to run the engine with: PythonSlicer inside Slicer, this one elsewhere."""
    try:
        from slicer import app
    except ImportError:  # slicer-core or plain Python: no application, this interpreter will do
        return sys.executable
    names = ("PythonSlicer.exe", "PythonSlicer") if os.name == "nt" else ("PythonSlicer",)
    folders = [os.path.join(app.slicerHome, "bin"), os.path.dirname(sys.executable)]
    candidates = [shutil.which(name) for name in names]  # Slicer puts its bin folder on PATH
    candidates += [os.path.join(folder, name) for folder in folders for name in names]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate):
            return candidate
    raise RuntimeError("PythonSlicer was not found (looked on PATH and in %s)" % ", ".join(folders))


def engine_folder():
    """The folder that holds the ``fmsam`` package (put on the process's path)."""
    import fmsam

    return os.path.dirname(os.path.dirname(os.path.abspath(fmsam.__file__)))


class EngineProcess:
    """One run of ``fmsam.worker`` on a request file in a private folder.

    ``folder``: the private temporary folder (the caller writes the request and inputs there
    before :meth:`start`; :meth:`discard` removes it). Lines the process prints come back from
    :meth:`poll`; ``returncode`` is None while it runs.
    """

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="%s%d-" % (FOLDER_PREFIX, os.getpid()))
        self.log_path = os.path.join(self.folder, "engine.log")
        self._process = None
        self._log = None
        self._offset = 0
        self._partial = ""
        self.lines = []          # every complete line so far
        self.killed = False

    def start(self, request_path, python=None):
        command = [python or python_executable(), "-c", _WORKER_CODE, engine_folder(), request_path]
        options = {}
        if os.name == "nt":
            options["creationflags"] = _CREATE_NO_WINDOW
        else:
            options["start_new_session"] = True  # its own process group, ended as a whole
        self._log = open(self.log_path, "wb")
        environment = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log,
                                         stderr=subprocess.STDOUT, cwd=self.folder, env=environment,
                                         **options)
        return self

    @property
    def returncode(self):
        return None if self._process is None else self._process.poll()

    @property
    def running(self):
        return self._process is not None and self._process.poll() is None

    def poll(self):
        """New complete lines of output since the last call (never blocks)."""
        if not os.path.isfile(self.log_path):
            return []
        with open(self.log_path, "rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        self._offset += len(data)
        text = self._partial + data.decode("utf-8", errors="replace")
        *complete, self._partial = text.split("\n")
        if self.returncode is not None and self._partial:  # the process is gone: nothing follows
            complete.append(self._partial)
            self._partial = ""
        new = [line.rstrip("\r") for line in complete]
        self.lines.extend(new)
        return new

    def kill(self, timeout=2.0):
        """End the process and everything it started; returns once they are gone (or ``timeout``).
        On POSIX the whole process group is ended even when the launcher itself is already gone
        (its child, the engine, may live on)."""
        process = self._process
        if process is None:
            return
        if os.name != "nt":
            try:
                os.killpg(process.pid, signal.SIGKILL)
                self.killed = True
            except OSError:  # the group is empty: nothing runs any more
                pass
        elif process.poll() is None:
            self.killed = True
            try:
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(process.pid)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, creationflags=_CREATE_NO_WINDOW, timeout=timeout)
            except (OSError, subprocess.SubprocessError):
                process.kill()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def discard(self):
        """Kill the process if it still runs and remove the private folder (always safe to call)."""
        self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None
        for _ in range(20):  # on Windows a file may stay locked for a moment after its process ended
            shutil.rmtree(self.folder, ignore_errors=True)
            if not os.path.exists(self.folder):
                return
            time.sleep(0.05)
