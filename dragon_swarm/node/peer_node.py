"""One object owns a peer's lifecycle: what starts, in which order, and how all of it stops.

Start order (cheap checks first, so a mistake is reported in a second and leaves the state dir as it was):
options and `--initial-peers` syntax, the state-dir lock, the panel, the dashboard port, resources (threads,
device, `--batch-size auto`, which forks and so must come before any DHT thread), the DHT (join) and the config
check, the training data, the views' DHT duties, the expert host, the expert router and the trainer.
Stop order is the reverse, with the bounded final publication of the contribution record while the DHT is
surely healthy, and no child process outliving the peer. `peer.py` is a thin command line over this class.
"""

from __future__ import annotations

import logging
import threading
import time

from dragon_swarm.node.cli import exit_if_shutdown_hangs, print_line
from dragon_swarm.events import EventBus, ExpertBanReport, HostReport, Paused, PauseGate, PeerState, Resumed, StateChanged, StepReport
from dragon_swarm.monitor.session import VolunteerSession
from dragon_swarm.node import startup
from dragon_swarm.node.processes import stop_descendants
from dragon_swarm.node.startup import StartupError
from dragon_swarm.node.state_dir import StartupGuard, StateDirBusy
from dragon_swarm.moe.backend import ExpertTamper
from dragon_swarm.training.contribution import GradientContribution

logger = logging.getLogger(__name__)

HOST_LOG_PERIOD_S = 30.0


class PeerNode:
    """Construct (starts nothing), `start()`, `run()` until `stop_event` is set, then `shutdown()` (always, also
    after a failed start). `contribution` replaces the trainer's honest one and `expert_tamper` makes its expert
    path Byzantine (tests and benchmarks only)."""

    def __init__(
        self,
        options,
        stop_event: threading.Event | None = None,
        contribution: GradientContribution | None = None,
        expert_tamper: ExpertTamper | None = None,
    ):
        self.options = options
        self.stop_event = stop_event if stop_event is not None else threading.Event()
        self.contribution = contribution
        self.expert_tamper = expert_tamper
        self.bus = EventBus()
        self.gate = PauseGate(self.bus)
        role = "trainer+host" if options.train and options.host_spec != "" else ("trainer" if options.train else "host")
        self.views = VolunteerSession(
            options.config, options.state_dir, options.name, role, options.dashboard, options.panel, bus=self.bus, gate=self.gate
        )
        self.guard = StartupGuard(options.state_dir, options.identity)
        self.dht = self.host = self.dispatcher = self.trainer = self.announcer = None
        self.started = False
        self._announced_trainer = False  # local-expert mode: others wait for this trainer at their rounds' barriers
        self.bus.subscribe(self._on_paused, Paused)
        self.bus.subscribe(self._on_resumed, Resumed)
        if options.stats_file is not None:
            from dragon_swarm.training.stats import StatsWriter

            self.bus.subscribe(StatsWriter(options.stats_file).write, StepReport, ExpertBanReport)

    # --- start ---

    def start(self) -> None:
        """Raises StartupError (one line for the volunteer) when the peer cannot start."""
        o = self.options
        startup.check_initial_peers(o.initial_peers)
        try:
            self.guard.begin()  # the state-dir lock: a second peer on this dir stops here
        except StateDirBusy as e:
            raise StartupError(str(e)) from None
        except OSError as e:  # the state dir cannot be created or written
            raise StartupError(f"--state-dir {o.state_dir}: {e.strerror or e}") from None
        if o.init_from is not None:  # rollback: the state dir starts from an exported model, before anything reads it
            from dragon_swarm.node.init_from import init_state_dir

            init_state_dir(o.init_from, o.config, o.state_dir, train=o.train, host=o.host_spec != "")
        self.views.start_display()  # the volunteer sees JOINING from now on
        try:
            self.views.start_dashboard()
        except OSError as e:  # the port is taken or the address is not ours
            raise StartupError(f"--dashboard {o.dashboard[0]}:{o.dashboard[1]}: {e.strerror or e}") from None
        self.options = o = startup.apply_resources(o)
        self._join()
        train_stream, self.val_stream = startup.load_training_data(o) if o.train else (None, None)
        self.views.attach(self.dht, update_model_from_dht=not o.train)
        from dragon_swarm.swarm.config_check import ConfigAnnouncer

        self.announcer = ConfigAnnouncer(self.dht, o.config)
        self.announcer.start()
        self._start_roles(train_stream)
        self.started = True
        self.guard.commit()

    def _join(self) -> None:
        from dragon_swarm.swarm.config_check import mismatch_message, other_config_hashes
        from dragon_swarm.swarm.admission import admission_policy
        from dragon_swarm.swarm.dht_node import initial_peers_line, join_error, start_dht

        o = self.options
        try:
            self.dht = start_dht(
                initial_peers=o.initial_peers, host_maddrs=o.host_maddrs, announce_maddrs=o.announce_maddrs,
                identity_path=o.identity, client_mode=o.client_mode, auto_relay=o.auto_relay,
                admission=admission_policy(o.config.swarm.identity_bits, o.swarm_key, o.initial_peers),
            )
        except Exception as e:  # p2pd errors: bad multiaddr, taken identity, unreachable peers
            raise StartupError(join_error(e)) from None
        if o.initial_peers:
            others = other_config_hashes(self.dht, o.config)
            if others:
                raise StartupError(mismatch_message(o.config, others, o.config_name))
        logger.info(f"Swarm {o.config.run_prefix}, peer id {self.dht.peer_id.to_base58()}")
        print_line(f"To join this swarm: {startup.join_command()} -c {o.config_name} {initial_peers_line(self.dht)}")
        loopback_only = all(maddr.startswith("/ip4/127.") for maddr in o.host_maddrs)
        if loopback_only and not o.announce_maddrs:
            logger.info(
                "This peer listens on 127.0.0.1 only: peers on other machines cannot join it. To open it, add "
                "--host-maddrs /ip4/0.0.0.0/tcp/31338 --announce-maddrs /ip4/<this machine's public IP>/tcp/31338"
            )
        elif o.initial_peers and not o.client_mode and not o.auto_relay:  # ask the initial peers to dial us back, in one line
            from dragon_swarm.swarm.admission import peer_ids_of
            from dragon_swarm.swarm.dht_node import visible_maddrs
            from dragon_swarm.swarm.reachability import check_reachability_in_background

            check_reachability_in_background(self.dht, peer_ids_of(o.initial_peers), o.announce_maddrs or visible_maddrs(self.dht))

    def _start_roles(self, train_stream) -> None:
        o = self.options
        local_mode = o.train and o.config.training.mode == "local_experts"
        if local_mode and o.host_spec == "":
            why = "--client-mode (a peer nobody can dial hosts nothing)" if o.client_mode else "--no-host"
            raise StartupError(f"training.mode local_experts trains the experts this peer holds: drop {why}")
        if local_mode:  # the trainers already in the swarm wait for this one at their next round's barrier from now on
            from dragon_swarm.training.local_trainer import announce_trainer

            try:
                announce_trainer(self.dht, o.config, 0)
                self._announced_trainer = True
            except Exception as e:
                logger.debug(f"Announcing this trainer failed: {e}")
        uids = startup.choose_experts(self.dht, o)
        if uids:
            # in local-expert mode the trainer merges its experts with their other holders between micro-batches
            self.host = startup.start_host(self.dht, o, uids, self.bus, tamper=self.expert_tamper, periodic_sync=not local_mode)
        elif o.train:
            self.views.set_role("trainer")  # auto-selection found every expert served: this peer only trains
        else:
            raise StartupError("nothing to do: --no-train and no experts to host")
        if local_mode:
            from dragon_swarm.training.local_trainer import LocalExpertsTrainer

            self.trainer = LocalExpertsTrainer(
                o.config, self.dht, self.host, train_stream, o.state_dir, o.batch_size, o.device,
                bus=self.bus, gate=self.gate, contribution=self.contribution, val_stream=self.val_stream,
                keep_versions=o.keep_versions,
            )  # fmt: skip
        elif o.train:
            from dragon_swarm.training.trainer import Trainer

            local = self.host.backends if self.host is not None else {}
            self.dispatcher = startup.start_dispatcher(self.dht, o, local, tamper=self.expert_tamper, bus=self.bus)
            if self.host is not None:  # a new set of hosted experts (takeover, rebalancing) is called directly too
                self.host.listeners.append(lambda backends: setattr(self.dispatcher, "local_backends", backends))
            self.trainer = Trainer(
                o.config, self.dht, self.dispatcher, train_stream, o.state_dir, o.batch_size, o.device,
                bus=self.bus, gate=self.gate, contribution=self.contribution, val_stream=self.val_stream,
                keep_versions=o.keep_versions, client_mode=o.client_mode, identity=o.identity,
            )  # fmt: skip

    # --- run ---

    def run(self) -> None:
        if self.trainer is not None:
            self._train()
        else:
            self._serve()

    def _train(self) -> None:
        o, trainer = self.options, self.trainer
        if o.max_steps is not None and trainer.micro_batches >= o.max_steps:
            logger.warning(
                f"Nothing to train: this peer has already trained {trainer.micro_batches} micro-batches in this state dir "
                f"and --max-steps is {o.max_steps}; raise --max-steps to train more"
            )
            return
        trainer.sync_with_swarm()
        trainer.train(o.max_steps, self.stop_event)
        epoch = trainer.epoch if hasattr(trainer, "epoch") else trainer.optimizer.local_epoch
        logger.info(f"Training stopped at micro-batch {trainer.micro_batches}, epoch {epoch}")

    def _serve(self) -> None:
        """A host-only peer: serve, follow Start/Stop, log what was served every HOST_LOG_PERIOD_S."""
        self.bus.publish(StateChanged(PeerState.HOSTING))
        last_log, paused = time.monotonic(), False
        while not self.stop_event.wait(0.5):
            if self.gate.paused != paused:
                paused = self.gate.paused
                self.bus.publish(StateChanged(PeerState.IDLE if paused else PeerState.HOSTING))
                self.bus.publish(Paused() if paused else Resumed())
            if time.monotonic() - last_log >= HOST_LOG_PERIOD_S:
                last_log = time.monotonic()
                r: HostReport = self.host.report()
                logger.info(
                    f"Hosting {r.experts_served} experts: {r.tokens_processed:,} tokens served, "
                    f"{r.requests_served:,} requests, {r.updates} updates"
                )

    def _on_paused(self, event: Paused) -> None:
        if self.host is not None:
            self.host.pause()

    def _on_resumed(self, event: Resumed) -> None:
        if self.host is not None:
            self.host.resume()

    # --- stop ---

    def shutdown(self) -> None:
        """Stop everything in reverse order; safe after a failed or partial start. A failed start leaves the state
        dir as it found it."""
        self.stop_event.set()
        exit_if_shutdown_hangs(120.0)
        if self.announcer is not None:
            self.announcer.stop()
        if self.host is not None:
            self.host.stop_reporting()  # the final HostReport: counted before the contribution record goes out
        self.views.leave(save=self.started)
        for part in (self.trainer, self.dispatcher, self.host):
            if part is not None:
                try:
                    part.shutdown()
                except Exception:
                    logger.exception(f"{type(part).__name__} did not shut down cleanly")
        self.views.shutdown()
        if self._announced_trainer and self.trainer is None:  # it announced itself but never started training
            from dragon_swarm.training.local_trainer import announce_trainer

            try:
                announce_trainer(self.dht, self.options.config, -1)
            except Exception as e:
                logger.debug(f"Withdrawing this trainer's announcement failed: {e}")
        if self.dht is not None:
            self.dht.shutdown()
        stop_descendants()  # before the rollback: children share the lock, and nothing may write after it
        self.guard.end()
