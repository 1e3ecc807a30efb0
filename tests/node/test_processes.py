"""dragon_swarm.node.processes with real process trees: stubborn grandchildren are stopped by PID, orphans stay
findable under a subreaper, forked children follow a parent that dies (also by SIGKILL)."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from dragon_swarm.node.processes import descendant_pids, is_alive, process_info, stop_descendants
from tests.node.helpers import Helper

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl are Linux only")


@pytest.fixture
def helpers():
    started: list[Helper] = []

    def start(body: str) -> Helper:
        helper = Helper(body)
        started.append(helper)
        return helper

    try:
        yield start
    finally:
        for helper in started:
            helper.cleanup()


def test_descendants_are_found_by_parent_links(helpers):
    h = helpers(
        """
        child, grandchild = tree(ignore=False)
        say(child=child, grandchild=grandchild)
        time.sleep(60)
        """
    )
    tree = h.read()
    found = descendant_pids(h.pid)
    assert found == [tree["child"], tree["grandchild"]]  # parents before children
    assert os.getpid() not in found and h.pid not in found
    assert process_info(tree["grandchild"]).ppid == tree["child"]


def test_stop_descendants_kills_what_ignores_sigterm_and_reaps_it(helpers):
    h = helpers(
        """
        child, grandchild = tree(ignore=True)
        say(child=child, grandchild=grandchild)
        t0 = time.monotonic()
        killed = P.stop_descendants(grace_s=0.3, kill_wait_s=2.0)
        say(killed=sorted(killed), left=P.descendant_pids(), seconds=time.monotonic() - t0, me_alive=True)
        """
    )
    tree = h.read()
    result = h.read()
    assert result["killed"] == sorted([tree["child"], tree["grandchild"]])
    assert result["left"] == []  # reaped: no zombie of ours is left either
    assert result["seconds"] < 3.0
    assert h.alive([tree["child"], tree["grandchild"]]) == []
    assert h.proc.wait(timeout=10) == 0  # it never signalled itself


def test_polite_children_go_on_sigterm_alone(helpers):
    h = helpers(
        """
        child, grandchild = tree(ignore=False)
        say(child=child, grandchild=grandchild)
        t0 = time.monotonic()
        say(killed=P.stop_descendants(grace_s=5.0), seconds=time.monotonic() - t0)
        """
    )
    tree = h.read()
    result = h.read()
    assert result["killed"] == []
    assert result["seconds"] < 2.0  # does not sit out the grace period once they are gone
    assert h.alive([tree["child"], tree["grandchild"]]) == []


def test_dead_children_are_reaped_and_their_owners_do_not_hang(helpers):
    """Zombies (dead, not yet waited for) are collected; a Popen whose child was stopped and reaped here still
    returns from wait() (it then reads ECHILD, which subprocess reports as 0)."""
    h = helpers(
        """
        import multiprocessing, subprocess
        zombie = os.fork()
        if zombie == 0:
            os._exit(0)
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        forked = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,), daemon=True)
        forked.start()
        deadline = time.monotonic() + 10  # the forked child exits at once, but a loaded machine may not run it at once
        while P.process_info(zombie).state != "Z" and time.monotonic() < deadline:
            time.sleep(0.05)
        say(zombie=zombie, state=P.process_info(zombie).state, other=other.pid, forked=forked.pid)
        killed = P.stop_descendants(grace_s=10.0)  # returns as soon as they are gone; 2 s was tight in one CI run
        # on a loaded machine the child can still be on its way out when stop_descendants has seen it go (one CI run
        # read is_alive() True): join lets multiprocessing collect its exit status, which is what this test is about
        forked.join(timeout=5)
        say(killed=killed, left=P.descendant_pids(), other_waits=other.wait(timeout=5) is not None,
            forked_alive=forked.is_alive(), forked_code=forked.exitcode)
        """
    )
    first = h.read()
    assert first["state"] == "Z"
    result = h.read()
    assert result["killed"] == [] and result["left"] == []
    assert result["other_waits"]
    # multiprocessing children are reaped through multiprocessing: their Process objects know how they ended
    assert result["forked_alive"] is False and result["forked_code"] == -signal.SIGTERM


def test_stop_descendants_of_another_root_leaves_the_rest_alone(helpers):
    h = helpers(
        """
        child, grandchild = tree(ignore=True)
        say(child=child, grandchild=grandchild)
        time.sleep(60)
        """
    )
    tree = h.read()
    killed = stop_descendants(grace_s=0.2, root=tree["child"])
    assert killed == [tree["grandchild"]]
    assert h.alive([tree["grandchild"]]) == []
    assert h.alive([h.pid, tree["child"]]) == [h.pid, tree["child"]]


def test_subreaper_keeps_orphaned_grandchildren_findable(helpers):
    h = helpers(
        """
        say(subreaper=P.become_subreaper(), is_subreaper=P.is_subreaper())
        child, grandchild = tree(ignore=True, child_exits=True)
        os.waitpid(child, 0)
        time.sleep(0.2)
        say(grandchild=grandchild, parent=P.process_info(grandchild).ppid, found=P.descendant_pids())
        say(killed=P.stop_descendants(grace_s=0.2), left=P.descendant_pids())
        """
    )
    assert h.read() == {"subreaper": True, "is_subreaper": True}
    orphan = h.read()
    assert orphan["parent"] == h.pid  # re-parented to the subreaper, not to init
    assert orphan["found"] == [orphan["grandchild"]]
    result = h.read()
    assert result == {"killed": [orphan["grandchild"]], "left": []}
    assert h.alive([orphan["grandchild"]]) == []


def test_without_subreaper_an_orphan_escapes_the_tree(helpers):
    """Why become_subreaper() is needed: p2pd orphaned by a dead DHT process is nobody's descendant any more."""
    h = helpers(
        """
        child, grandchild = tree(ignore=False, child_exits=True)
        os.waitpid(child, 0)
        time.sleep(0.2)
        say(grandchild=grandchild, found=P.descendant_pids())
        time.sleep(60)
        """
    )
    orphan = h.read()
    assert orphan["grandchild"] not in orphan["found"]
    assert process_info(orphan["grandchild"]).ppid != h.pid


def test_exit_now_takes_every_descendant_along(helpers):
    h = helpers(
        """
        child, grandchild = tree(ignore=True)
        say(child=child, grandchild=grandchild)
        P.exit_now(3, grace_s=0.2)
        """
    )
    tree = h.read()
    assert h.proc.wait(timeout=10) == 3
    assert h.alive([tree["child"], tree["grandchild"]]) == []


def test_exit_now_from_a_second_signal_in_a_handler(helpers):
    """The cli.StopSignal pattern: first signal sets an event, the second calls exit_now from the handler."""
    h = helpers(
        """
        first = threading.Event()
        def handle(signum, frame):
            if first.is_set():
                P.exit_now(128 + signum, grace_s=0.2)
            first.set()
        signal.signal(signal.SIGINT, handle)
        child, grandchild = tree(ignore=True)
        say(child=child, grandchild=grandchild)
        while True:
            time.sleep(0.1)
        """
    )
    tree = h.read()
    os.killpg(h.pid, signal.SIGINT)  # Ctrl-C: the whole group, children (which ignore it) included
    time.sleep(0.3)
    os.killpg(h.pid, signal.SIGINT)
    assert h.proc.wait(timeout=10) == 128 + signal.SIGINT
    assert h.alive([tree["child"], tree["grandchild"]]) == []


def test_die_with_descendants_stops_a_childs_own_children(helpers):
    """What a forked DHT process does on SIGTERM: take its p2pd along, then die of SIGTERM."""
    h = helpers(
        """
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            signal.signal(signal.SIGTERM, lambda signum, frame: P.die_with_descendants(signum))
            grandchild = os.fork()
            if grandchild == 0:
                stubborn()
                while True:
                    time.sleep(1)
            os.write(w, f"{grandchild}\\n".encode())
            while True:
                time.sleep(0.1)
        grandchild = int(os.read(r, 64).decode())
        say(child=child, grandchild=grandchild)
        _, status = os.waitpid(child, 0)
        say(signal=os.WTERMSIG(status) if os.WIFSIGNALED(status) else None)
        """
    )
    tree = h.read()
    os.kill(tree["child"], signal.SIGTERM)
    assert h.read()["signal"] == signal.SIGTERM
    assert h.wait_gone([tree["grandchild"]], timeout=3.0) == []


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_forked_children_die_with_their_parent(helpers, how):
    """install_parent_death_signal: a peer that dies without cleaning up (SIGKILL, OOM) still takes its forked
    children along, those forked from the main thread and from other threads alike."""
    h = helpers(
        """
        say(installed=D.install_parent_death_signal(signal.SIGTERM))
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        main_child, main_grandchild = tree(ignore=False)
        from_thread = []
        t = threading.Thread(target=lambda: from_thread.append(tree(ignore=False)))
        t.start(); t.join()
        thread_child, thread_grandchild = from_thread[0]
        say(children=[main_child, main_grandchild, thread_child, thread_grandchild])
        while True:
            time.sleep(0.1)
        """
    )
    assert h.read() == {"installed": True}
    children = h.read()["children"]
    time.sleep(1.5)  # the thread that forked two of them has exited: they must still run
    assert h.alive(children) == children
    os.kill(h.pid, getattr(signal, how))
    h.proc.wait(timeout=10)
    assert h.wait_gone(children, timeout=5.0) == []


def test_pdeathsig_is_not_used_for_forks_from_other_threads(helpers):
    """PR_SET_PDEATHSIG fires when the forking *thread* ends; a child forked from a short-lived thread must survive
    that thread (it is watched by its parent's PID instead)."""
    h = helpers(
        """
        D.install_parent_death_signal(signal.SIGKILL)
        got = []
        t = threading.Thread(target=lambda: got.append(tree(ignore=False)))
        t.start(); t.join()
        say(child=got[0][0])
        time.sleep(60)
        """
    )
    child = h.read()["child"]
    time.sleep(1.0)
    assert h.alive([child]) == [child]
    assert is_alive(h.pid)
