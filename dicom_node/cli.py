"""The ``mr2ct`` command."""

from __future__ import annotations

import logging
import os
import re
import shlex
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer

app = typer.Typer(help="mr2ct: MR series in by C-STORE, synthetic CT and provenance SR out to Orthanc.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the effective configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
tokens_app = typer.Typer(help="Bearer tokens of the admin API.", no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")
models_app = typer.Typer(help="The model registry.", no_args_is_help=True)
app.add_typer(models_app, name="models")
spool_app = typer.Typer(help="The spool of received originals.", no_args_is_help=True)
series_app = typer.Typer(help="Series the node received.", no_args_is_help=True)
app.add_typer(series_app, name="series")
app.add_typer(spool_app, name="spool")
audit_app = typer.Typer(help="The audit trail: its export to an audit record repository (audit_syslog), a patient's lineage.",
                        no_args_is_help=True)
app.add_typer(audit_app, name="audit")

ConfigOption = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config file (MR2CT_CONFIG also works)")]
RecordPull = Annotated[bool, typer.Option("--record/--no-record", help="write an audit row per study fetched into the node's database "
                                          "(database_url of --config), which its audit_syslog sends on")]


class JsonLines(logging.Formatter):
    """One JSON object per line (``log_format = "json"``), for a log collector: time (UTC, ISO 8601),
    level, logger, message, process, thread, and the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        import json
        from datetime import datetime, timezone

        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                 "level": record.levelname, "logger": record.name, "message": record.getMessage(), "process": record.process,
                 "thread": record.threadName}
        if record.exc_info:  # as the handler's filter left it (WithholdQuotedValues), else in full
            entry["traceback"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class WithholdQuotedValues(logging.Filter):
    """pydicom quotes a value that breaks its VR's rules ("Invalid value for VR DA: '1970-02-03'"),
    and highdicom a person name it doubts: a patient's name, birth date or age, or, where a length
    was wrong, the elements that followed, the name among them. Their lines keep what was wrong and
    withhold the value (no patient identifiers in log lines); so do the exception messages of a
    traceback (a failed job's) where one of them raised ("Unable to convert '1970-02-03' to 'DA'"),
    its code lines kept."""

    LIBRARIES = ("pydicom", "highdicom")
    QUOTED = re.compile(r"""(['"]).*\1""", re.DOTALL)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.partition(".")[0] in self.LIBRARIES:
            record.msg, record.args = self.QUOTED.sub("<value withheld>", record.getMessage()), ()
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text and self._raised_in_library(record.exc_info[1]):
            text = logging.Formatter().formatException(record.exc_info)  # what a handler's formatter would write
            # its code lines are indented; the rest (headers, each exception's message) have their quoted text withheld
            record.exc_text = "\n".join(line if line[:1].isspace() else self.QUOTED.sub("<value withheld>", line) for line in text.splitlines())
        return True

    @classmethod
    def _raised_in_library(cls, exc: BaseException | None) -> bool:
        seen: set[int] = set()
        while exc is not None and id(exc) not in seen:  # the exception and those it came from
            seen.add(id(exc))
            tb = exc.__traceback__
            while tb is not None:
                if any(f"{os.sep}{name}{os.sep}" in tb.tb_frame.f_code.co_filename for name in cls.LIBRARIES):
                    return True
                tb = tb.tb_next
            exc = exc.__cause__ or exc.__context__
        return False


def _logging(verbose: bool = False, log_format: str | None = None) -> None:
    """The root logger's level and format. ``log_format``: serve's setting; the other commands
    (train, pull, evaluate, ...) take ``MR2CT_LOG_FORMAT`` (text by default), so a training job on a
    cluster writes the same JSON lines as the node (until 2026-12-05 only serve could)."""
    if log_format is None:
        log_format = os.environ.get("MR2CT_LOG_FORMAT", "text").strip().lower() or "text"
        if log_format not in ("text", "json"):
            typer.echo(f"mr2ct: MR2CT_LOG_FORMAT must be text or json, got {log_format!r}", err=True)
            raise typer.Exit(2)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(WithholdQuotedValues())
        if log_format == "json":
            handler.setFormatter(JsonLines())
    # pydicom also hands each such line to warnings, printed whole on stderr: its log line says it
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # one "setup plugin" line per plugin at every start
    if not verbose:  # a line per migration (34 on a new database): dicom_node.db says what changed in one
        logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)


@app.command()
def train(
    out: Annotated[Path, typer.Option(help="run folder to write (model.safetensors, model.json, losses.csv)")],
    preset: Annotated[str, typer.Option(help="quick | zhu2017")] = "quick",
    epochs: Annotated[Optional[int], typer.Option()] = None,
    steps_per_epoch: Annotated[Optional[int], typer.Option()] = None,
    batch_size: Annotated[Optional[int], typer.Option()] = None,
    lambda_aba: Annotated[Optional[float], typer.Option("--lambda-ABA")] = None,
    lambda_bab: Annotated[Optional[float], typer.Option("--lambda-BAB")] = None,
    lr_g: Annotated[Optional[float], typer.Option("--lr-G")] = None,
    lr_d: Annotated[Optional[float], typer.Option("--lr-D")] = None,
    synthetic_pool_size: Annotated[Optional[int], typer.Option()] = None,
    subjects_per_pool: Annotated[Optional[int], typer.Option()] = None,
    seed: Annotated[Optional[int], typer.Option()] = None,
    max_minutes: Annotated[Optional[float], typer.Option(help="stop after the epoch that passes this")] = None,
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for torch")] = None,
    data: Annotated[Optional[Path], typer.Option(help="dataset cache made by `mr2ct pull` (default: generated phantoms)")] = None,
    generator_iterations: Annotated[Optional[int], typer.Option()] = None,
    discriminator_iterations: Annotated[Optional[int], typer.Option()] = None,
    beta1: Annotated[Optional[float], typer.Option()] = None,
    beta2: Annotated[Optional[float], typer.Option()] = None,
    image_size: Annotated[Optional[int], typer.Option()] = None,
    crop_size: Annotated[Optional[int], typer.Option(help="train on random crops of this size")] = None,
    ngf: Annotated[Optional[int], typer.Option(help="generator filters in the first layer")] = None,
    n_blocks: Annotated[Optional[int], typer.Option(help="residual blocks of the ResNet generator")] = None,
    ndf: Annotated[Optional[int], typer.Option(help="discriminator filters in the first layer")] = None,
    d_layers: Annotated[Optional[int], typer.Option(min=1, max=6, help="discriminator layers (3: 70x70 PatchGAN, 4: 142x142)")] = None,
    pixel_spacing: Annotated[Optional[float], typer.Option(help="model grid in mm (recorded in the card)")] = None,
    cycle_loss: Annotated[Optional[str], typer.Option(help="mae | mse")] = None,
    adversarial_loss: Annotated[Optional[str], typer.Option(help="bce (paper) | lsgan (Zhu et al.) | wgan-gp")] = None,
    identity_weight: Annotated[Optional[float], typer.Option()] = None,
    structure_weight: Annotated[Optional[float], typer.Option(
        help="MIND structure loss between each image and its translation (structure-constrained CycleGAN, Yang et al. 2018)")] = None,
    lr_decay_start: Annotated[Optional[int], typer.Option(help="epoch after which learning rates fall linearly to 0")] = None,
    ema_decay: Annotated[Optional[float], typer.Option(
        help="export an exponential moving average of the MR->CT generator's weights with this decay per step (e.g. 0.995; 0: last weights)")] = None,
    generator: Annotated[Optional[str], typer.Option(help="resnet | unet | fcn (the paper's fully convolutional layer recipe)")] = None,
    discriminator: Annotated[Optional[str], typer.Option(help="patch | paper")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="epochs between checkpoints (0: end only)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from OUT/checkpoint.pt")] = False,
    init_from: Annotated[Optional[Path], typer.Option(
        help="fine-tune: start from another run's folder/checkpoint.pt (all four networks) or a model .safetensors (MR->CT generator)")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    precision: Annotated[Optional[str], typer.Option(help="fp32 | bf16 (autocast forward passes; GPUs and bf16-capable CPUs)")] = None,
    test_time_augmentation: Annotated[Optional[str], typer.Option(
        help="none | mirror | dihedral | dihedral-shift: written into the exported card; inference averages the generator over that many views (1, 4, 8, 32)")] = None,
    record: Annotated[bool, typer.Option(
        "--record/--no-record", help="record the run and its losses, epoch by epoch, in the node's database (database_url of --config)")] = True,
    config: ConfigOption = None,
) -> None:
    """Train the CycleGAN on unpaired MR and CT pools: generated phantom heads, or a cache made by `mr2ct pull` (--data)."""
    import os
    from dataclasses import asdict

    from training.config import config_from

    _logging()
    try:  # every parameter is checked before torch is imported (seconds)
        cfg = config_from(
            preset,
            dict(
                epochs=epochs, steps_per_epoch=steps_per_epoch, batch_size=batch_size, lambda_ABA=lambda_aba,
                lambda_BAB=lambda_bab, lr_G=lr_g, lr_D=lr_d, synthetic_pool_size=synthetic_pool_size,
                subjects_per_pool=subjects_per_pool, seed=seed, max_minutes=max_minutes,
                data=str(data) if data else None, generator_iterations=generator_iterations,
                discriminator_iterations=discriminator_iterations, beta1=beta1, beta2=beta2, image_size=image_size,
                crop_size=crop_size, pixel_spacing_mm=pixel_spacing, ngf=ngf, n_blocks=n_blocks, ndf=ndf, d_layers=d_layers,
                cycle_loss=cycle_loss, adversarial_loss=adversarial_loss, identity_weight=identity_weight, structure_weight=structure_weight,
                lr_decay_start=lr_decay_start, ema_decay=ema_decay, generator=generator, discriminator=discriminator, checkpoint_every=checkpoint_every,
                precision=precision, init_from=str(init_from) if init_from else None, test_time_augmentation=test_time_augmentation,
            ),
        )
    except (ValueError, TypeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if data is not None:  # before a run is recorded: a mistyped path is not a failed training run
        from training.pacs_pull import DatasetCache

        try:
            DatasetCache.existing(data)
        except FileNotFoundError as exc:
            typer.echo(f"error: --data: {exc}", err=True)
            raise typer.Exit(2) from exc
    _output_folder("--out", out)
    import torch

    from training.trainer import TrainingInterrupted, learned_from_caches
    from training.trainer import train as run_training

    if threads:
        torch.set_num_threads(threads)
    command = "mr2ct " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    recorder, learned = None, None
    if record and int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 records
        from sqlalchemy.exc import SQLAlchemyError

        from dicom_node.db import DatabaseUnavailable, init_db
        from dicom_node.training_runs import RunRecorder

        try:
            recorder = RunRecorder(init_db(_settings(config).database_url))
            recorded = asdict(cfg)
            for key in ("data", "init_from"):  # the cache as `mr2ct pull`'s audit rows name it, the run fine-tuned from as its
                if recorded.get(key):          # row names its folder: GET /audit/lineage follows both
                    recorded[key] = str(Path(str(recorded[key])).resolve())
            recorded["learned_from_caches"] = learned = learned_from_caches(cfg, out, resume)  # the caches, wherever they are now
            run_id = recorder.start(out, command, recorded, resume=resume)
        except (DatabaseUnavailable, SQLAlchemyError) as exc:
            typer.echo(f"mr2ct: database_url: {exc}; fix it or train with --no-record (losses.csv only)", err=True)
            raise typer.Exit(2) from exc
        typer.echo(f"training run {run_id}: losses recorded in the database each epoch", err=True)
    try:
        card = run_training(cfg, out, command=command, device=device, resume=resume, on_epoch=recorder.epoch if recorder else None,
                            learned_from=learned)
    except ValueError as exc:
        if recorder:
            recorder.end("failed", reason=str(exc))
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    except TrainingInterrupted as exc:
        if recorder:
            recorder.end("interrupted")
        typer.echo(f"interrupted: checkpoint in {exc.args[0]}; continue with --resume", err=True)
        raise typer.Exit(130) from None
    except KeyboardInterrupt:  # before the first epoch (building the pools): nothing to save
        if recorder:
            recorder.end("interrupted")
        raise
    except BaseException as exc:
        if recorder:
            recorder.end("failed", reason=f"{type(exc).__name__}: {exc}")
        raise
    if card is None:
        return  # a non-zero rank under torchrun
    if recorder:
        recorder.end("finished", model_sha256=card["sha256"])
    typer.echo(f"model written: {out / 'model.safetensors'} sha256={card['sha256']}")


def _settings(config: Path | None):
    from dicom_node.settings import ConfigError, load_settings

    try:
        return load_settings(config)
    except ConfigError as exc:
        typer.echo(f"mr2ct: {exc}", err=True)
        raise typer.Exit(2) from exc


@app.command()
def serve(
    config: ConfigOption = None,
    role: Annotated[str, typer.Option(help="all | scp | worker | api")] = "all",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the DICOM node: C-STORE SCP, stability monitor and worker."""
    settings = _settings(config)  # a bad setting stops start-up before torch is imported (seconds)
    _logging(verbose, settings.log_format)
    from dicom_node.db import DatabaseUnavailable
    from dicom_node.service import Node
    from synthesis.errors import ModelMismatch

    try:
        node = Node(settings, role)
        node.run_until_signalled()
    except ModelMismatch as exc:
        typer.echo(f"mr2ct: model_file: {exc}", err=True)
        raise typer.Exit(2) from exc
    except DatabaseUnavailable as exc:
        typer.echo(f"mr2ct: database_url: {exc}", err=True)
        raise typer.Exit(2) from exc
    except ValueError as exc:
        typer.echo(f"mr2ct: {exc}", err=True)
        raise typer.Exit(2) from exc
    except OSError as exc:
        typer.echo(f"mr2ct: cannot start: {exc}", err=True)
        raise typer.Exit(1) from exc


@config_app.command("show")
def config_show(config: ConfigOption = None) -> None:
    """Print the effective settings (file, then MR2CT_* variables), secrets masked."""
    import json

    settings = _settings(config)
    typer.echo(json.dumps(settings.masked(), indent=2))


@config_app.command("check")
def config_check(config: ConfigOption = None) -> None:
    """Check what the node needs before it serves: the database, Orthanc and its login, the model,
    the spool, the ports, TLS files and the routing destination; a failure names the setting.
    Exit status 1 when any check fails."""
    from dicom_node.preflight import FAIL, run_checks

    checks = run_checks(_settings(config))
    for check in checks:
        typer.echo(f"{check.status:<5} {check.name:<12} {check.message}")
    failed = [c.name for c in checks if c.status == FAIL]
    if failed:
        typer.echo(f"mr2ct: {len(failed)} check(s) failed: {', '.join(failed)}", err=True)
        raise typer.Exit(1)


@app.command()
def conformance(
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="write it to this file (default: print it)")] = None,
) -> None:
    """Print the node's DICOM Conformance Statement (Markdown), made from the tables the node runs on."""
    from dicom_node.conformance import statement

    if output is not None:
        _output_file("--output", output)
    text = statement()
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text)
        typer.echo(f"wrote {output}")


def _host_port(option: str, value: str) -> tuple[str, int]:
    """``HOST:PORT`` of an option, or exit 2 naming the option."""
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        typer.echo(f"mr2ct: {option}: {value!r} is not HOST:PORT (a port 1-65535)", err=True)
        raise typer.Exit(2)
    return host, int(port)


@app.command("orthanc-config")
def orthanc_config_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="the file to write, e.g. /etc/mr2ct/orthanc.json (what orthanc-mr2ct.service starts)")],
    node: Annotated[str, typer.Option(help="HOST:PORT of the mr2ct node's C-STORE SCP, where the plugin sends stable MR series")] = "127.0.0.1:11112",
    node_aet: Annotated[str, typer.Option(help="the node's AE title (its ae_title)")] = "MR2CT",
    storage: Annotated[Path, typer.Option(help="Orthanc's storage (and SQLite index) folder")] = Path("/var/lib/orthanc/db"),
    aet: Annotated[str, typer.Option(help="Orthanc's own AE title")] = "ORTHANC",
    http_port: Annotated[int, typer.Option(min=1, max=65535)] = 8042,
    dicom_port: Annotated[int, typer.Option(min=1, max=65535)] = 4242,
    user: Annotated[str, typer.Option(help="the login mr2ct uses (its orthanc_username); a random password is made")] = "mr2ct",
    postgres: Annotated[Optional[str], typer.Option(help="HOST:PORT/DATABASE: keep Orthanc's index in PostgreSQL (several machines)")] = None,
    postgres_user: Annotated[str, typer.Option(help="PostgreSQL role of Orthanc's index")] = "orthanc",
    postgres_password: Annotated[str, typer.Option(help="its password (default none: trust, or libpq's PGPASSWORD/.pgpass)")] = "",
    plugin: Annotated[bool, typer.Option("--plugin/--no-plugin", help="load orthanc/plugin.py (routing of stable MR series, the Synthesize CT button)")] = True,
    node_api: Annotated[Optional[str], typer.Option(help="the node's admin API, e.g. https://mr2ct-api:8800: the Synthesize CT button asks it "
                                                    "for the series as Orthanc holds it (a requester token is made in the node's database "
                                                    "and written with it to orthanc-plugin.env beside --output)")] = None,
    node_api_ca: Annotated[Optional[Path], typer.Option(help="PEM CA that signed the node API's certificate (an https --node-api)")] = None,
    modality: Annotated[Optional[list[str]], typer.Option(
        "--modality", help="NAME=AE@HOST:PORT, repeatable: another DICOM modality of this Orthanc, e.g. the planning system the "
        "node's deliver_to names (tps=TPS@10.0.0.9:104); it may send Orthanc storage commitment reports (deliver_commitment)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing file (its password changes)")] = False,
    node_config: ConfigOption = None,
) -> None:
    """Write the configuration of a permanent Orthanc beside mr2ct: the project's orthanc.json with
    the node as DICOM modality `mr2ct` (and the --modality ones), the routing plugin, a login for
    mr2ct, and optionally the PostgreSQL index; the same settings the demo and the tests start Orthanc
    with. With --node-api, also the plugin's environment file (orthanc-plugin.env, which
    orthanc-mr2ct.service reads) with a new requester token of the node (--config: the node's)."""
    import json
    import re
    import secrets

    from dicom_node.local_stack import orthanc_config
    from dicom_node.settings import MODALITY_NAME_RE, _check_ae_title, parse_dicom_destination

    node_host, node_port = _host_port("--node", node)
    modalities: dict[str, list[str | int]] = {}
    for entry in modality or []:
        name, _, where = entry.partition("=")
        name = name.strip()
        try:
            if not MODALITY_NAME_RE.match(name) or name in modalities or name == "mr2ct":
                raise ValueError(f"{name!r} is not a new Orthanc modality name (letters, digits, '_', '-', '.'; at most 64; "
                                 "not mr2ct, the node's)")
            modalities[name] = list(parse_dicom_destination(where))
        except ValueError as exc:
            typer.echo(f"mr2ct: --modality {entry!r}: {exc} (NAME=AE@HOST:PORT, e.g. tps=TPS@10.0.0.9:104)", err=True)
            raise typer.Exit(2) from exc
    try:
        node_aet, aet = _check_ae_title(node_aet, "--node-aet"), _check_ae_title(aet, "--aet")
    except ValueError as exc:
        typer.echo(f"mr2ct: {exc}", err=True)
        raise typer.Exit(2) from exc
    index = None
    if postgres is not None:
        where, _, database = postgres.partition("/")
        pg_host, pg_port = _host_port("--postgres", where)
        if not database:
            typer.echo(f"mr2ct: --postgres: {postgres!r} names no database (HOST:PORT/DATABASE)", err=True)
            raise typer.Exit(2)
        index = {"Host": pg_host, "Port": pg_port, "Database": database, "Username": postgres_user, "Password": postgres_password}
    plugin_env = output.with_name("orthanc-plugin.env")
    if node_api is not None:
        node_api = node_api.strip().rstrip("/")
        if not plugin:
            typer.echo("mr2ct: --node-api is for the plugin's button: it needs --plugin", err=True)
            raise typer.Exit(2)
        if not re.match(r"^https?://[^/\s?#]+(/[^\s?#]*)?$", node_api):  # the plugin's own rule (orthanc/plugin.py)
            typer.echo(f"mr2ct: --node-api: {node_api!r} is not the node's API address, e.g. https://mr2ct-api:8800", err=True)
            raise typer.Exit(2)
        if node_api_ca is not None and (not node_api.startswith("https://") or not node_api_ca.is_file()):
            typer.echo(f"mr2ct: --node-api-ca: {node_api_ca} is not a file, or --node-api is not an https:// address", err=True)
            raise typer.Exit(2)
    elif node_api_ca is not None:
        typer.echo("mr2ct: --node-api-ca needs --node-api", err=True)
        raise typer.Exit(2)
    for path in (output, plugin_env) if node_api is not None else (output,):
        if path.exists() and not force:
            typer.echo(f"mr2ct: --output: {path} exists; --force replaces it (and its password or token)", err=True)
            raise typer.Exit(2)
    _output_file("--output", output)
    password = secrets.token_urlsafe(18)
    try:
        config = orthanc_config(storage=storage, http_port=http_port, dicom_port=dicom_port, aet=aet, users={user: password},
                                modalities={"mr2ct": [node_aet, node_host, node_port], **modalities}, python_plugin=plugin,
                                postgres_index=index)
    except RuntimeError as exc:
        typer.echo(f"mr2ct: {exc}", err=True)
        raise typer.Exit(1) from exc
    if node_api is not None:
        from dicom_node.tokens import create_token
        from dicom_node.db import init_db

        token = create_token(init_db(_settings(node_config).database_url), "requester", f"orthanc {aet}",
                             actor=f"{_os_user()} (mr2ct orthanc-config)")
        lines = [f"MR2CT_NODE_API={node_api}", f"MR2CT_NODE_API_TOKEN={token}"]
        if node_api_ca is not None:
            lines.append(f"MR2CT_NODE_API_CA_FILE={node_api_ca.resolve()}")
        plugin_env.touch(mode=0o600)
        plugin_env.chmod(0o600)
        plugin_env.write_text("\n".join(lines) + "\n")
    output.write_text(json.dumps(config, indent=2) + "\n")
    output.chmod(0o600)
    typer.echo(f"wrote {output} (mode 600: it holds a password; `chown orthanc {output}` where orthanc-mr2ct.service runs Orthanc as orthanc)")
    typer.echo(f"  Orthanc: HTTP {http_port} (loopback only; RemoteAccessAllowed in the file opens it), DICOM {dicom_port} as {aet}")
    typer.echo(f"  mr2ct logs in as {user!r} with password {password}: set orthanc_username and MR2CT_ORTHANC_PASSWORD")
    if plugin:
        typer.echo(f"  stable MR series go to {node_aet} at {node_host}:{node_port}: allow this Orthanc there "
                   f"(allowed_aes = [\"{aet}@<this host>\"])")
    for name, (title, host, port) in modalities.items():
        typer.echo(f"  modality {name}: {title}@{host}:{port} (deliver_to = [\"{name}\"] sends it each sCT; with deliver_commitment "
                   f"it reports to {aet} at this host's DICOM port {dicom_port})")
    if node_api is not None:
        typer.echo(f"wrote {plugin_env} (mode 600: a requester token named 'orthanc {aet}'; `chown orthanc` it too): the Synthesize CT "
                   f"button asks {node_api} for the series as Orthanc holds it")
    if index is not None:
        typer.echo(f"  index in PostgreSQL {index['Host']}:{index['Port']}/{index['Database']} as {postgres_user}"
                   + ("" if postgres_password else " (no password: trust, or libpq's PGPASSWORD/.pgpass)"))


@app.command()
def demo(
    once: Annotated[bool, typer.Option("--once", help="stop everything after printing where the sCT is")] = False,
    workdir: Annotated[Path, typer.Option(help="folder for Orthanc storage, spool, database, logs")] = Path("var/demo"),
    orthanc_http_port: Annotated[int, typer.Option()] = 8042,
    orthanc_dicom_port: Annotated[int, typer.Option()] = 4242,
    node_port: Annotated[int, typer.Option()] = 11112,
    api_port: Annotated[int, typer.Option()] = 8800,
    slices: Annotated[int, typer.Option(min=2, max=512)] = 32,
) -> None:
    """Start Orthanc and mr2ct on loopback, send a phantom MR series, show where the sCT is."""
    from dicom_node.demo import run_demo

    _output_folder("--workdir", workdir)
    try:
        code = run_demo(workdir, once, orthanc_http_port, orthanc_dicom_port, node_port, slices, say=typer.echo, api_port=api_port)
    except (RuntimeError, TimeoutError) as exc:
        typer.echo(f"mr2ct demo: {exc}", err=True)
        raise typer.Exit(1) from exc
    raise typer.Exit(code)


@app.command()
def qa(
    node: Annotated[Optional[str], typer.Option(help="AE@host:port of the node to test (default: this config's ae_title on "
                                                     "127.0.0.1:dicom_port)")] = None,
    calling_ae: Annotated[str, typer.Option(help="the AE title the QA sends as (must be in the node's allowed_aes)")] = "MR2CT_QA",
    seed: Annotated[int, typer.Option(help="the phantom head (the same seed, the same anatomy: figures comparable day to day)")] = 424_242,
    slices: Annotated[int, typer.Option(min=1, max=512)] = 16,
    size: Annotated[int, typer.Option(min=32, max=1024)] = 256,
    pixel_spacing: Annotated[float, typer.Option(min=0.2, max=10.0, help="mm")] = 1.0,
    slice_spacing: Annotated[float, typer.Option(min=0.2, max=20.0, help="mm")] = 4.0,
    max_mae_hu: Annotated[Optional[float], typer.Option(help="fail (exit 1) when the sCT's MAE inside the body is above this")] = None,
    timeout: Annotated[float, typer.Option(min=1.0, help="seconds to wait for the sCT in Orthanc")] = 900.0,
    keep: Annotated[bool, typer.Option("--keep", help="keep the QA study in Orthanc (deleted by default)")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="end with one JSON object of the figures")] = False,
    tls: Annotated[bool, typer.Option("--tls", help="DICOM over TLS: the node's certificate checked against tls_ca_file, "
                                                    "tls_certificate presented")] = False,
    config: ConfigOption = None,
) -> None:
    """Constancy QA of the running service: a phantom head with a known CT goes through the node as
    a scanner's MR series; its sCT is read back from Orthanc and scored (MAE, mean error, per
    tissue). Exit 1 when it is above --max-mae-hu or no sCT came; each run is an audit row (qa-run)."""
    import json

    from dicom_node import audit
    from dicom_node.db import init_db
    from dicom_node.qa import INTERLOCK_KEYS, QaFailed, default_node, run_qa
    from dicom_node.settings import parse_dicom_destination
    from synthesis.errors import PacsUnavailable

    settings = _settings(config)
    node = node or default_node(settings)
    try:
        parse_dicom_destination(node)
    except ValueError as exc:
        typer.echo(f"mr2ct qa: --node: {exc}", err=True)
        raise typer.Exit(2)
    if tls and settings.tls_ca_file is None:
        typer.echo("mr2ct qa: --tls needs tls_ca_file (the CA that signed the node's certificate)", err=True)
        raise typer.Exit(2)
    sessions = init_db(settings.database_url)
    try:
        result = run_qa(settings, node, calling_ae, seed=seed, slices=slices, size=size, pixel_spacing=pixel_spacing,
                        slice_spacing=slice_spacing, timeout=timeout, keep=keep, max_mae_hu=max_mae_hu, tls=tls,
                        say=lambda line: typer.echo(line, err=True), sessions=sessions)
    except (QaFailed, PacsUnavailable) as exc:
        audit.record(sessions, "qa-run", "failure", f"mr2ct qa {calling_ae}", node=node, reason=str(exc)[:500])
        typer.echo(f"mr2ct qa: {exc}", err=True)
        raise typer.Exit(1)
    audit.record(sessions, "qa-run", "success" if result["passed"] else "failure", f"mr2ct qa {calling_ae}", study_uid=result["study_uid"],
                 **{k: v for k, v in result.items() if k != "study_uid"})
    tissues = ", ".join(f"{name} {value:g}" for name, value in result["mae_by_tissue"].items())
    typer.echo(f"sCT MAE {result['mae_hu']:g} HU inside the body (mean error {result['bias_hu']:+g} HU), {result['slices']} slices, "
               f"{result['seconds']:g} s in all; by tissue: {tissues}")
    for key in INTERLOCK_KEYS:
        interlock, name = result.get(key) or {}, key.removesuffix("_interlock").replace("_", " ")
        if interlock.get("refused"):
            typer.echo(f"{name} interlock: the {interlock['series']} series was left unsynthesized, as it must be")
        elif interlock.get("refused") is None and interlock:
            typer.echo(f"{name} interlock: {interlock['node_said']}")
        elif interlock.get("refused") is False:
            typer.echo(f"mr2ct qa: FAILED: the node did not leave the {interlock['series']} interlock series unsynthesized "
                       f"({interlock['node_said']})", err=True)
    if max_mae_hu is not None and result["mae_hu"] > max_mae_hu:
        typer.echo(f"mr2ct qa: FAILED: MAE {result['mae_hu']:g} HU is above --max-mae-hu {max_mae_hu:g}", err=True)
    if json_output:
        typer.echo(json.dumps(result))
    if not result["passed"]:
        raise typer.Exit(1)


@app.command("sample-mr")
def sample_mr(
    out: Annotated[Path, typer.Option(help="folder to write the MR instances into")],
    seed: Annotated[int, typer.Option()] = 1,
    slices: Annotated[int, typer.Option(min=1, max=1024)] = 32,
    size: Annotated[int, typer.Option(min=16, max=1024)] = 256,
    pixel_spacing: Annotated[float, typer.Option(min=0.05, max=50.0, help="mm")] = 1.0,
    slice_spacing: Annotated[float, typer.Option(min=0.05, max=100.0, help="mm")] = 4.0,
    contrast: Annotated[str, typer.Option(help="the contrast its header says by a textbook protocol's TR, TE and TI (T1, T2, "
                                               "FLUID_ATTENUATED, PROTON_DENSITY, STIR, T2_STAR): a series to check the node's "
                                               "select_acquisition_contrasts with; the pixels stay the phantom's T1")] = "T1",
    contrast_agent: Annotated[Optional[str], typer.Option(help="an agent's name (e.g. GADOBUTROL) its header says was given: a "
                                                          "post-contrast series to check the node's select_contrast_agent with; "
                                                          "the pixels stay unenhanced")] = None,
    fat_suppressed: Annotated[bool, typer.Option(help="its header says fat was suppressed (FS in ScanOptions): a series to check "
                                                     "the node's select_fat_suppression with; the pixels keep their fat bright")] = False,
) -> None:
    """Write a phantom head MR series (what a scanner would send): T1, or a header of another contrast, a contrast agent or fat suppression."""
    from synthesis.contrast import EXAMPLE_TIMINGS
    from training.phantom_dicom import write_mr_series

    told = contrast.strip().upper()
    if told not in EXAMPLE_TIMINGS:
        typer.echo(f"mr2ct: --contrast {contrast!r} is none of {', '.join(EXAMPLE_TIMINGS)}", err=True)
        raise typer.Exit(2)
    agent = (contrast_agent or "").strip()
    if contrast_agent is not None and not re.fullmatch(r"[^\\\x00-\x1f]{1,64}", agent):
        typer.echo(f"mr2ct: --contrast-agent {contrast_agent!r} is no agent's name (1-64 characters, no backslash)", err=True)
        raise typer.Exit(2)
    _output_folder("--out", out)
    label = f"{told} + {agent}" if agent else ("" if told == "T1" else told)
    if fat_suppressed:
        label = f"{label or told} FS"
    series = write_mr_series(out, seed=seed, slices=slices, size=size, pixel_spacing=pixel_spacing, slice_spacing=slice_spacing,
                             mr_timing=EXAMPLE_TIMINGS[told], contrast_agent=agent or None, fat_suppressed=fat_suppressed,
                             **({"uid_key": f"-{label}", "series_description": f"{label} (phantom)"} if label else {}))
    typer.echo(f"{len(series.files)} MR instances in {out} (series {series.series_uid}{f', header {label}' if label else ''})")


@app.command()
def figures(
    run: Annotated[Path, typer.Argument(help="a run folder of `mr2ct train`, still training or stopped")],
    out: Annotated[Optional[Path], typer.Option(help="folder for the PNGs (default: the run folder)")] = None,
) -> None:
    """Draw a run's loss curves and sample grid (real MR, real CT, sCT, synthetic MR) now, from its losses so far and latest checkpoint."""
    from training.figures import run_losses

    _logging()
    if out is not None:
        _output_folder("--out", out)
    try:
        run_losses(run)  # a folder that is no run is refused before torch is imported (seconds)
        from training.trainer import draw_figures

        written = draw_figures(run, out)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    for path in written:
        typer.echo(str(path))


def _tissue_table(quality: Any, legend: str, beside: tuple[str, dict[str, float]] | None = None) -> None:
    """The per-tissue rows of `mr2ct evaluate`: MAE, bias and "no level" MAE, and one more model's MAE beside them."""
    typer.echo(f"  {'tissue':16s} {'MAE':>7s} {'bias':>7s} {'no level':>8s}" + (f" {beside[0]:>11s}" if beside else "") + f"   {legend}")
    for tissue, value in quality.mae_by_tissue.items():
        typer.echo(f"  {tissue:16s} {value:7.1f} {quality.bias_by_tissue[tissue]:+7.1f} {quality.mae_level_removed_by_tissue[tissue]:8.1f}"
                   + (f" {beside[1][tissue]:11.1f}" if beside else ""))


@app.command()
def evaluate(
    model: Annotated[Optional[Path], typer.Argument(help="model .safetensors or run folder (default: the shipped model)")] = None,
    subjects: Annotated[int, typer.Option(min=1, max=100)] = 4,
    slices: Annotated[int, typer.Option(min=1, max=256)] = 24,
    first_subject: Annotated[int, typer.Option(min=0, max=10_000, help="score held-out subjects from this one on (0: the usual set; 100: four others)")] = 0,
    json_only: Annotated[bool, typer.Option("--json", help="print only the JSON report")] = False,
    panel: Annotated[Optional[Path], typer.Option(help="write a PNG panel: MR, CT, sCT, error map")] = None,
    paired_steps: Annotated[int, typer.Option(help="train a paired supervised generator of the same size for this many steps (0: skip)")] = 0,
    paired_cache: Annotated[Optional[Path], typer.Option(
        help="keep the paired bound in this folder and reuse it when a model of the same architecture, grid and "
             "--paired-steps asks again (it takes most of an hour for 9,000 steps on a 2-core CPU)")] = None,
    test_time_augmentation: Annotated[Optional[str], typer.Option(
        help="none | mirror | dihedral | dihedral-shift instead of the card's (the paired upper bound is run the same way)")] = None,
    record: Annotated[bool, typer.Option(
        "--record", help="write this evaluation into the model's card as its metrics (the weights and their SHA-256 stay)")] = False,
    pairs: Annotated[Optional[Path], typer.Option(
        "--pairs", help="score on your own paired studies instead of phantoms: a folder of DICOM files where an MR series "
                        "and a CT series of one patient share a frame of reference, or a spatial registration (REG) there "
                        "relates their frames; the CT is resampled onto the MR")] = None,
    training_cache: Annotated[Optional[Path], typer.Option(
        "--training-cache", help="with --pairs: leave out the patients of this `mr2ct pull` cache (what the model "
                                 "was trained on), so the score is on unseen patients")] = None,
    against: Annotated[Optional[Path], typer.Option(
        "--against", help="with --pairs: score this model too (e.g. the active one) on the same pairs, pair by pair, "
                          "with a signed-rank test of the difference")] = None,
    registry: Annotated[bool, typer.Option(
        "--registry", help="with --pairs: keep the report in the node's database (database_url of --config), where "
                           "`mr2ct models list`, the admin API and the dashboard show it next to the model")] = False,
    label: Annotated[str, typer.Option(help="with --registry: a name for the set of pairs, at most 128 characters (no patient identifiers)")] = "",
    device: Annotated[str, typer.Option(
        help="auto | cpu | cuda: where the model runs and the paired bound trains (auto: a CUDA GPU when torch sees one)")] = "auto",
    precision: Annotated[str, typer.Option(
        help="auto | fp32 | bf16 | fp16: inference precision, as the node's setting (auto: bf16 where the device runs it "
             "natively, else fp32); the report says which ran")] = "auto",
    config: ConfigOption = None,
) -> None:
    """Score a model on held-out paired phantoms (or, with --pairs, on your own MR/CT pairs): MAE/PSNR/SSIM against ground-truth CT and a linear baseline."""
    import json

    from synthesis import default_model_path
    from synthesis.card import TEST_TIME_AUGMENTATIONS, read_card, weights_in
    from synthesis.errors import ModelMismatch

    # Everything that can be refused is refused before torch is imported and the model built (seconds).
    def refuse(message: str) -> NoReturn:
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2)

    if panel is not None:  # before the scoring: the panel is written at its end
        _output_file("--panel", panel)
    if paired_cache is not None:
        _output_folder("--paired-cache", paired_cache)
        if paired_steps <= 0:
            refuse("--paired-cache goes with --paired-steps")
    if test_time_augmentation is not None and test_time_augmentation not in TEST_TIME_AUGMENTATIONS:
        refuse(f"--test-time-augmentation must be one of {', '.join(TEST_TIME_AUGMENTATIONS)}, got {test_time_augmentation!r}")
    if pairs is not None and (record or paired_steps):
        refuse("--pairs scores your own studies; --record and --paired-steps belong to the phantom evaluation "
               "(a card keeps phantom figures; the paired bound trains on phantoms)")
    if pairs is None and (against is not None or registry):
        refuse(f"{'--against' if against is not None else '--registry'} goes with --pairs")
    if pairs is None and training_cache is not None:
        refuse("--training-cache goes with --pairs (held-out phantoms are never in a pulled cache)")
    if len(label) > 128:
        refuse(f"--label is {len(label)} characters long; at most 128")
    if device not in ("auto", "cpu", "cuda"):
        refuse(f"--device must be auto, cpu or cuda, got {device!r}")
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        refuse(f"--precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    weights = weights_in(model) if model is not None else default_model_path()
    if against is not None:
        against = weights_in(against)

    def card_of(path: Path, what: str = "") -> dict[str, Any]:
        try:
            return read_card(path)
        except ModelMismatch as exc:
            typer.echo(f"mr2ct: {what}{exc}", err=True)
            raise typer.Exit(2) from exc

    card = card_of(weights)
    if against is not None:
        card_of(against, "--against: ")
    if record and test_time_augmentation not in (None, card.get("test_time_augmentation", "none")):
        # The card must describe the model as it runs: record only what its own views score.
        refuse("--record scores the model as its card runs it; drop --test-time-augmentation "
               "(or change the card first with `mr2ct models set`)")
    if pairs is not None:
        found, sessions = _pairs_to_score(pairs, training_cache, registry, config)

    from synthesis.model_file import load_model
    from training.evaluate import RATIO_LEVEL, evaluate as run_evaluation, linear_figures, paired_figures

    ran_on = _evaluation_device(device, precision)
    try:
        loaded = load_model(weights)
    except ModelMismatch as exc:
        typer.echo(f"mr2ct: {exc}", err=True)
        raise typer.Exit(2) from exc
    if test_time_augmentation is not None:
        loaded = loaded.with_views(test_time_augmentation)
    if pairs is not None:
        _evaluate_pairs(loaded, pairs, found, sessions, panel, json_only, against, label, ran_on)
        return
    quality = run_evaluation(loaded, subjects=subjects, slices=slices, panel=panel, first_subject=first_subject,
                             device=ran_on.device, precision=ran_on.precision)
    linear = linear_figures(quality)
    paired = None
    if paired_steps > 0:
        from training.evaluate import cached_paired_upper_bound

        try:
            bound, reused = cached_paired_upper_bound(loaded, paired_steps, paired_cache, device=ran_on.device)
        except ModelMismatch as exc:
            typer.echo(f"mr2ct: {exc}", err=True)
            raise typer.Exit(2) from exc
        if reused and not json_only:
            typer.echo(f"paired supervised upper bound: the one trained before, {bound.weights_path}")
        paired = run_evaluation(bound, subjects=subjects, slices=slices, first_subject=first_subject, device=ran_on.device,
                                precision=ran_on.precision)
    bounded = paired_figures(paired, quality)
    if not json_only:
        typer.echo(f"model {loaded.short_digest} (test-time augmentation {loaded.test_time_augmentation}; {ran_on.words}): "
                   f"MAE {quality.mae_hu} HU (linear baseline {quality.baseline_mae_hu} HU), "
                   f"PSNR {quality.psnr_db} dB (baseline {quality.baseline_psnr_db} dB), SSIM {quality.ssim}")
        _tissue_table(quality, "(HU; bias: mean sCT - CT; no level: the MAE left with each head's own mean error taken away)",
                      ("paired MAE", paired.mae_by_tissue) if paired else None)
        heads = len(quality.mae_by_subject)

        def spread(interval: list[float] | None) -> str:
            return f" ({RATIO_LEVEL:.0%} of the ratios over the {heads} heads drawn again with replacement: {interval[0]:.2f}-{interval[1]:.2f}x)" \
                if interval else ""

        if heads > 1:
            typer.echo(f"MAE per head (subject {first_subject} on): {', '.join(f'{m:.1f}' for m in quality.mae_by_subject)} HU")
        if linear["mae_over_linear"] is not None:
            typer.echo(f"the model over the linear baseline: {linear['mae_over_linear']:.2f}x{spread(linear['mae_over_linear_interval'])}")
        typer.echo(f"grid floor: the ground-truth CT itself, taken to the model's {loaded.pixel_spacing_mm:g} mm grid and back, "
                   f"scores {quality.grid_floor_mae_hu} HU (a practical floor for any model on that grid)")
        if paired is None:
            typer.echo("paired supervised upper bound: not computed (use --paired-steps N)")
        else:
            typer.echo(f"paired supervised upper bound ({paired_steps} steps): MAE {paired.mae_hu} HU"
                       + (f"; the model is {bounded['mae_over_paired']:.2f}x it" if bounded["mae_over_paired"] is not None else "")
                       + spread(bounded["mae_over_paired_interval"]))
            if paired.mae_hu and len(quality.mae_by_subject) > 1:
                heads = ", ".join(f"{m:.1f}/{b:.1f} = {m / b:.2f}x" if b else f"{m:.1f}/{b:.1f}"
                                  for m, b in zip(quality.mae_by_subject, paired.mae_by_subject))
                typer.echo(f"per head, model/bound: {heads}")
    report = {**quality.as_dict(), "mae_linear_hu": quality.baseline_mae_hu, **linear, **bounded, "model_sha256": loaded.sha256,
              "test_time_augmentation": loaded.test_time_augmentation, "first_subject": first_subject, **ran_on.fields}
    if record:
        from synthesis.model_file import card_path_for, record_metrics

        try:
            metrics = {**quality.card_metrics(loaded.test_time_augmentation, slices, first_subject, paired, paired_steps), **ran_on.fields}
            record_metrics(loaded.weights_path, metrics, loaded.sha256)
        except ModelMismatch as exc:
            typer.echo(f"mr2ct: {exc}", err=True)
            raise typer.Exit(2) from exc
        if not json_only:
            typer.echo(f"recorded in {card_path_for(loaded.weights_path)}")
    typer.echo(json.dumps(report))


def _pairs_to_score(folder: Path, training_cache: Optional[Path], registry: bool, config: Optional[Path]) -> tuple[Any, Any]:
    """What `mr2ct evaluate --pairs` checks before it loads a model: the database (with --registry)
    opens, and the folder holds pairs (of patients not in --training-cache). Returns the pairs
    found and the session factory (None without --registry); a refusal exits 2 with the reason."""
    sessions = None
    if registry:  # before the scoring: a database that does not open stops the command at once
        from dicom_node.db import DatabaseUnavailable, init_db

        try:
            sessions = init_db(_settings(config).database_url)
        except DatabaseUnavailable as exc:
            typer.echo(f"mr2ct: database_url: {exc}; fix it or evaluate without --registry", err=True)
            raise typer.Exit(2) from exc
    from training.pairs import find_pairs, leave_out_trained

    try:
        found = find_pairs(folder)
        if training_cache is not None:
            found = leave_out_trained(found, training_cache)
    except FileNotFoundError as exc:
        typer.echo(f"error: --pairs: {exc}", err=True)
        raise typer.Exit(2) from exc
    if not found.pairs:
        typer.echo(f"error: --pairs: no MR series in {folder} has a CT series of the same patient in its frame of reference "
                   f"({found.files} DICOM files read)" + (" among the patients not in the training cache" if training_cache else ""), err=True)
        for reason in found.skipped:
            typer.echo(f"  left out: {reason}", err=True)
        raise typer.Exit(2)
    return found, sessions


@dataclass(frozen=True)
class _RanOn:
    """Where `mr2ct evaluate` runs its models (and trains a paired bound), in which precision."""

    device: Any  # torch.device
    label: str  # synthesis.infer.DeviceChoice.label: "cpu (2 threads)", "cuda (NVIDIA H100 ...)"
    precision: str  # the one that runs: fp32, bf16 or fp16

    @property
    def words(self) -> str:
        return f"{self.precision} on {self.label}"

    @property
    def fields(self) -> dict[str, str]:
        """What a report and a card's metrics say of it: a figure is read with the precision it ran in
        (until 2026-12-08 neither said, and `auto` runs bf16 on a CPU with AVX-512 BF16 or AMX)."""
        return {"device": self.label, "precision": self.precision}


def _evaluation_device(device: str, precision: str) -> _RanOn:
    from synthesis.infer import choose_device, precision_name, resolve_precision

    try:
        choice = choose_device(device)
    except ValueError as exc:
        typer.echo(f"error: --device: {exc}", err=True)
        raise typer.Exit(2) from exc
    return _RanOn(choice.device, choice.label, precision_name(resolve_precision(precision, choice.device)))


def _evaluate_pairs(loaded: Any, folder: Path, found: Any, sessions: Any, panel: Optional[Path], json_only: bool,
                    against_path: Optional[Path], label: str, ran_on: _RanOn) -> None:
    """`mr2ct evaluate --pairs FOLDER`: the table and JSON report of a model on a hospital's own MR/CT
    pairs (``found`` by _pairs_to_score; with --against, a second model's beside it; with --registry,
    kept in the database ``sessions``)."""
    import json
    from dataclasses import asdict

    import numpy as np

    from dicom_node.registry import pairs_digest, record_evaluation
    from synthesis.errors import ModelMismatch, SeriesNotUsable
    from synthesis.model_file import load_model
    from training.evaluate import CT_BANDS, compare_pairs, evaluate_pairs, linear_figures

    against = None
    if against_path is not None:  # its card was checked by `evaluate`; here the weights must also fit it
        try:
            against = load_model(against_path)
        except ModelMismatch as exc:
            typer.echo(f"mr2ct: --against: {exc}", err=True)
            raise typer.Exit(2) from exc
    skipped = list(found.skipped)

    def skip(pair: Any, reason: str) -> None:
        skipped.append(f"{pair.mr.label()} with {pair.ct.label()}: {reason}")

    try:
        scores = evaluate_pairs([loaded] if against is None else [loaded, against], found.pairs, panel=panel, on_skip=skip,
                                device=ran_on.device, precision=ran_on.precision)
    except SeriesNotUsable as exc:
        typer.echo(f"error: --pairs: {exc}", err=True)
        for reason in skipped:
            typer.echo(f"  left out: {reason}", err=True)
        raise typer.Exit(2) from exc
    quality, results = scores[0]
    comparison = None
    if against is not None:
        other, other_results = scores[1]
        comparison = {"model_sha256": against.sha256, "test_time_augmentation": against.test_time_augmentation, "mae_hu": other.mae_hu,
                      "psnr_db": other.psnr_db, "ssim": other.ssim, "mae_by_tissue": other.mae_by_tissue,
                      "pairs_mae_hu": [r.mae_hu for r in other_results], **compare_pairs(results, other_results)}
    if not json_only:
        typer.echo(f"model {loaded.short_digest} (test-time augmentation {loaded.test_time_augmentation}; {ran_on.words}) on {len(results)} MR/CT pair(s) "
                   f"from {folder}: MAE {quality.mae_hu} HU (linear baseline {quality.baseline_mae_hu} HU), "
                   f"PSNR {quality.psnr_db} dB (baseline {quality.baseline_psnr_db} dB), SSIM {quality.ssim}")
        bands = ", ".join(f"{name} " + (f"< {high:g}" if low == -np.inf else f">= {low:g}" if high == np.inf else f"{low:g} to {high:g}")
                          for name, low, high in CT_BANDS)
        _tissue_table(quality, f"(HU, inside the body; tissue by the CT: {bands}; no level: the MAE left with each pair's own "
                               "mean error taken away)", ("against", comparison["mae_by_tissue"]) if comparison else None)
        for i, r in enumerate(results, 1):
            typer.echo(f"  pair {i}: MR {r.mr_series_uid}, CT {r.ct_series_uid}"
                       + (f" (registered by {r.registration})" if r.registration else "") + f": {r.slices} slices, the CT reaches "
                       f"{100 * r.ct_coverage:.0f} % of the MR's voxels, MAE {r.mae_hu} HU"
                       + (f" (against: {comparison['pairs_mae_hu'][i - 1]} HU)" if comparison else ""))
        if comparison is not None:
            test = ("too few pairs for a signed-rank test (6 or more)" if comparison["wilcoxon_p"] is None
                    else f"Wilcoxon signed-rank p = {comparison['wilcoxon_p']}")
            typer.echo(f"against model {against.short_digest} (test-time augmentation {against.test_time_augmentation}): MAE "
                       f"{comparison['mae_hu']} HU, PSNR {comparison['psnr_db']} dB, SSIM {comparison['ssim']}; the model is better on "
                       f"{comparison['better_on_pairs']} of {comparison['pairs']} pairs, worse on {comparison['worse_on_pairs']} "
                       f"(median MAE difference {comparison['median_difference_hu']:+} HU; {test})")
        typer.echo(f"grid floor: the CT itself, taken to the model's {loaded.pixel_spacing_mm:g} mm grid and back, scores "
                   f"{quality.grid_floor_mae_hu} HU")
        for reason in skipped:
            typer.echo(f"left out: {reason}")
    report = {**quality.as_dict(), "mae_linear_hu": quality.baseline_mae_hu, **linear_figures(quality), "mae_paired_hu": None,
              "model_sha256": loaded.sha256,
              "test_time_augmentation": loaded.test_time_augmentation, **ran_on.fields, "pairs": [asdict(r) for r in results], "left_out": skipped,
              "against": comparison}
    report["dataset_digest"] = pairs_digest(report["pairs"])
    if sessions is not None:
        row = record_evaluation(sessions, report, label)
        if not json_only:
            typer.echo(f"recorded as evaluation {row.id} of model {loaded.short_digest} (pairs {row.dataset_digest[:12]})")
    typer.echo(json.dumps(report))


@app.command()
def phantoms(
    out: Annotated[Path, typer.Option(help="folder for the DICOM studies")],
    mr_subjects: Annotated[int, typer.Option(min=0)] = 8,
    ct_subjects: Annotated[int, typer.Option(min=0)] = 8,
    paired_subjects: Annotated[int, typer.Option(min=0)] = 2,
    seed: Annotated[int, typer.Option()] = 0,
    slices: Annotated[int, typer.Option(min=1)] = 24,
    size: Annotated[int, typer.Option(min=16)] = 128,
    pixel_spacing: Annotated[float, typer.Option(min=0.05, max=50.0, help="mm")] = 2.0,
    upload: Annotated[Optional[str], typer.Option(help="Orthanc URL to upload the studies to")] = None,
    username: Annotated[Optional[str], typer.Option(envvar="MR2CT_ORTHANC_USERNAME")] = None,
    password: Annotated[Optional[str], typer.Option(envvar="MR2CT_ORTHANC_PASSWORD")] = None,
) -> None:
    """Generate a synthetic head cohort as DICOM: MR-only, CT-only and paired held-out subjects."""
    from dicom_node.orthanc_store import OrthancStore
    from synthesis.errors import PacsUnavailable
    from training.phantom_dicom import write_cohort

    _output_folder("--out", out)
    cohort = write_cohort(out, mr_subjects=mr_subjects, ct_subjects=ct_subjects, paired_subjects=paired_subjects, seed=seed,
                          slices=slices, size=size, pixel_spacing=pixel_spacing)
    series = [*cohort.mr_only, *cohort.ct_only, *(s for pair in cohort.paired for s in pair)]
    typer.echo(f"{len(series)} series ({sum(len(s.files) for s in series)} instances) in {out}")
    if upload:
        from synthesis.progress import progress_bar

        store = OrthancStore(upload, username, password)
        try:
            store.check_reachable()
            for s in progress_bar(series, desc="upload", unit="series"):
                for f in s.files:
                    store.client.upload(f.read_bytes())
        except PacsUnavailable as exc:
            typer.echo(f"mr2ct: {exc}", err=True)
            raise typer.Exit(1) from exc
        typer.echo(f"uploaded to {upload}")


def _output_folder(option: str, path: Path) -> None:
    """A folder a command writes into: made when missing; a path that cannot be one (a file is
    there, no permission) stops the command before any work, naming the option."""
    if path.exists() and not path.is_dir():
        typer.echo(f"mr2ct: {option}: {path} is a file, not a folder", err=True)
        raise typer.Exit(2)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        typer.echo(f"mr2ct: {option}: cannot use {path} as a folder: {exc.strerror or exc}", err=True)
        raise typer.Exit(2) from exc


def _output_file(option: str, path: Path) -> None:
    """A file a command writes at the end of its work (a panel after an evaluation): its folder is
    made and checked first, so that a path that cannot be written does not throw the work away."""
    if path.is_dir():
        typer.echo(f"mr2ct: {option}: {path} is a folder; give a file name", err=True)
        raise typer.Exit(2)
    _output_folder(option, path.parent)


def _check_dates(date_from: str | None, date_to: str | None) -> None:
    """Study date filters are DICOM dates (YYYYMMDD), the range in order: checked before the PACS is
    asked (a PACS may read 2026-01-01 as a range of its own, or match nothing without a word)."""
    import datetime

    parsed = {}
    for option, value in (("--date-from", date_from), ("--date-to", date_to)):
        if value is None:
            continue
        try:
            if not re.fullmatch(r"\d{8}", value):
                raise ValueError
            parsed[option] = datetime.datetime.strptime(value, "%Y%m%d").date()
        except ValueError as exc:
            typer.echo(f"mr2ct: {option} must be a date as YYYYMMDD (e.g. 20260131), got {value!r}", err=True)
            raise typer.Exit(2) from exc
    if len(parsed) == 2 and parsed["--date-from"] > parsed["--date-to"]:
        typer.echo(f"mr2ct: --date-from {date_from} is after --date-to {date_to}", err=True)
        raise typer.Exit(2)


def _check_regex(option: str, pattern: str | None) -> None:
    """A filter pattern that is not a regular expression stops the command before the PACS is asked."""
    if pattern is None:
        return
    try:
        re.compile(pattern)
    except re.error as exc:
        typer.echo(f"mr2ct: {option} is not a regular expression: {exc}", err=True)
        raise typer.Exit(2) from exc


PacsAttempts = Annotated[int, typer.Option(min=1, help="tries per request when the PACS is unreachable or busy (back-off 2, 4, 8, 16 s)")]


@app.command()
def pull(
    url: Annotated[str, typer.Option(help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")],
    cache: Annotated[Path, typer.Option(help="dataset cache folder")],
    modality: Annotated[list[str], typer.Option(help="MR and/or CT (repeat the option)")] = ["MR", "CT"],
    body_part: Annotated[Optional[str], typer.Option()] = None,
    description: Annotated[Optional[str], typer.Option(help="regex on SeriesDescription")] = None,
    date_from: Annotated[Optional[str], typer.Option(help="YYYYMMDD")] = None,
    date_to: Annotated[Optional[str], typer.Option(help="YYYYMMDD")] = None,
    limit: Annotated[Optional[int], typer.Option(help="at most this many series per modality in the cache (series left out do not count: the next is taken)")] = None,
    validation_fraction: Annotated[float, typer.Option(min=0.0, max=0.9)] = 0.2,
    username: Annotated[Optional[str], typer.Option(envvar="MR2CT_PACS_USERNAME")] = None,
    password: Annotated[Optional[str], typer.Option(envvar="MR2CT_PACS_PASSWORD")] = None,
    attempts: PacsAttempts = 5,
    mr_contrast: Annotated[list[str], typer.Option(help="MR contrasts to pull, told by each series' header as the node tells them "
                                                   "(repeat the option; ANY: all): a T1 model's pool should hold T1 heads only")] = ["T1"],
    mr_contrast_agent: Annotated[str, typer.Option(help="MR series to pull by whether their header says a contrast agent was given, "
                                                   "as the node tells it: without, with or any (the card's mr_contrast_agents, which "
                                                   "the node's select_contrast_agent is checked against)")] = "without",
    mr_fat_suppression: Annotated[str, typer.Option(help="likewise by whether their header says fat was suppressed: without, with "
                                                    "or any (the card's mr_fat_suppression; the node's select_fat_suppression)")] = "without",
    prune: Annotated[bool, typer.Option("--prune", help="remove from the cache the series the PACS no longer holds (asked of each "
                                        "cached series the searches did not find; their patients still count as trained on)")] = False,
    record: RecordPull = True,
    config: ConfigOption = None,
) -> None:
    """Pull unpaired MR and CT series from a DICOMweb PACS into a local dataset cache (resumable)."""
    from synthesis.contrast import CHOICES, CONTRASTS
    from training.pacs_pull import DatasetCache, PullFilter, pull as run_pull

    _logging()
    bad = [m for m in modality if m not in ("MR", "CT")]
    if bad:
        typer.echo(f"mr2ct: --modality must be MR or CT, got {bad}", err=True)
        raise typer.Exit(2)
    _check_regex("--description", description)
    _check_dates(date_from, date_to)
    contrasts = tuple(dict.fromkeys(c.strip().upper() for c in mr_contrast))
    if "ANY" in contrasts:
        contrasts = ()
    unknown = [c for c in contrasts if c not in CONTRASTS]
    if unknown:
        typer.echo(f"mr2ct: --mr-contrast {unknown} is not an MR contrast; known: {', '.join(CONTRASTS)} or ANY", err=True)
        raise typer.Exit(2)
    # (count key, option, what it is about, its value): without, with or any
    with_without = [("contrast_agent", "--mr-contrast-agent", "a contrast agent", mr_contrast_agent.strip().lower()),
                    ("fat_suppression", "--mr-fat-suppression", "fat suppression", mr_fat_suppression.strip().lower())]
    for _key, option, _what, chosen in with_without:
        if chosen not in CHOICES:
            typer.echo(f"mr2ct: {option} {chosen!r} is none of {', '.join(CHOICES)}", err=True)
            raise typer.Exit(2)
    agents, fat = (() if chosen == "any" else CHOICES[chosen] for _key, _option, _what, chosen in with_without)
    _output_folder("--cache", cache)
    filters = [PullFilter(m, body_part, description, date_from, date_to, limit, *((contrasts, agents, fat) if m == "MR" else ()))
               for m in modality]
    counts = _audited_pull(record, config, "pull", url, cache, lambda fetched, removed: run_pull(
        url, cache, filters, username=username, password=password, validation_fraction=validation_fraction, attempts=attempts,
        prune=prune, fetched=fetched, removed=removed))
    enhanced = "".join(f", {counts[key]} MR series {'without' if chosen == 'with' else 'with'} {what} ({option} {chosen})"
                       for key, option, what, chosen in with_without if chosen != "any")
    refreshed = (f", fetched again {counts['refreshed']} that an earlier pull cached in their acquired plane (now the axial slices "
                 "the node synthesizes)") if counts["refreshed"] else ""
    refreshed += (f", fetched again {counts['changed']} of which the PACS now holds another number of instances than the cache "
                  "was made of") if counts["changed"] else ""
    refreshed += f", removed {counts['removed']} the PACS no longer holds (--prune)" if prune else ""
    refreshed += f", not taken {counts['withdrawn']} of patients withdrawn from the cache (mr2ct forget)" if counts["withdrawn"] else ""
    typer.echo(f"found {counts['found']} series, fetched {counts['fetched']}, already cached {counts['skipped']}{refreshed}, left out "
               f"{counts['synthetic']} synthetic (Synthetic Data YES, e.g. mr2ct's own sCTs), {counts['localizer']} localizer(s) (ImageType "
               f"LOCALIZER, e.g. CT topograms), {counts['mosaic']} mosaic(s) (ImageType MOSAIC: a volume's slices tiled in one "
               f"image), {counts['phase']} of phase images (ImageType P and the like, or GE's or the enhanced MR's complex component: "
               f"angles, not tissue), {counts['complex']} of real or imaginary images (the same, R, I), {counts['dixon']} Dixon water, fat or "
               f"opposed-phase series (ImageType WATER, FAT, OPP_PHASE: the in-phase one is the T1) and {counts['unusable']} that "
               "make no volume "
               f"(reasons in {cache / 'left_out.jsonl'}); not pulled {counts['contrast']} MR series of another contrast than "
               f"{', '.join(contrasts) or 'any'} (--mr-contrast; in the log){enhanced} -> {cache}")
    still = len(DatasetCache(cache).outdated())
    if still:  # cached by an earlier mr2ct, not matched by this pull's filters
        typer.echo(f"{still} series in the cache are still in their acquired plane (3D sagittal or coronal, cached before "
                   "2026-12-03): a pull whose filters match them fetches them again as axial slices")


def _audited_pull(record: bool, config: Optional[Path], command: str, url: str, folder: Path, run: Any) -> dict[str, int]:
    """``run(fetched, removed)``, a pull, with its audit rows (``_audit_pulled``) written after it,
    or after the PACS error that stopped it (exit 1). The node's database is opened before the PACS
    is asked: one that does not open stops the command (exit 2); none with --no-record."""
    from synthesis.errors import PacsUnavailable

    sessions = None
    if record:
        from dicom_node.db import DatabaseUnavailable, init_db

        try:
            sessions = init_db(_settings(config).database_url)
        except DatabaseUnavailable as exc:
            typer.echo(f"mr2ct: database_url: {exc}; fix it or pull with --no-record (no audit rows)", err=True)
            raise typer.Exit(2) from exc
    fetched: list[dict[str, Any]] = []
    removed: list[str] = []
    try:
        counts: dict[str, int] = run(fetched, removed)
    except PacsUnavailable as exc:
        _audit_pulled(sessions, command, url, folder, fetched, removed, str(exc))
        typer.echo(f"mr2ct: {exc}", err=True)
        raise typer.Exit(1) from exc
    _audit_pulled(sessions, command, url, folder, fetched, removed)
    return counts


def _audit_pulled(sessions: Any, command: str, url: str, folder: Path, fetched: list[dict[str, Any]], removed: list[str],
                  error: str | None = None) -> None:
    """A pull's audit rows, in one transaction: ``pacs-data-pulled``, one per study it fetched
    series of (its patient, series and instances: what the audit trail's DICOM Instances
    Transferred message reports, study by study), and a failure row when the PACS stopped it;
    ``pulled-data-removed``, one per study ``--prune`` deleted series of (study and patient as the
    rows of the pull that copied them into this folder name them; one row without for series
    pulled before pulls were audited)."""
    if sessions is None:
        return
    from urllib.parse import urlsplit, urlunsplit

    from dicom_node import audit
    from training.pacs_pull import cache_id

    actor = f"{_os_user()} (mr2ct {command})"
    parts = urlsplit(url)
    source = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))  # without user:password@, should the URL carry them
    where = {"source": source, "destination": str(folder.resolve()), "cache_id": cache_id(folder), "command": command}
    studies: dict[str, list[dict[str, Any]]] = {}
    for item in fetched:
        studies.setdefault(item["study"], []).append(item)
    with sessions.begin() as session:
        for study_uid, items in studies.items():
            session.add(audit.event(audit.DATA_PULLED, "success", actor, study_uid=study_uid, patient_id=items[0]["patient_id"],
                                    issuer=items[0].get("issuer", ""), series=[i["series"] for i in items],
                                    instances=sum(i["instances"] for i in items), **where))
        if error:
            session.add(audit.event(audit.DATA_PULLED, "failure", actor, reason=error[:500], series_fetched=len(fetched), **where))
        if removed:
            _audit_removed(session, actor, where, removed, "the PACS no longer holds them (--prune)")


def _os_user() -> str:
    """Who runs this command, as the audit rows name them."""
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container)
        return f"uid {os.getuid()}"


def _audit_removed(session: Any, actor: str, where: dict[str, Any], removed: list[str], why: str) -> None:
    """``pulled-data-removed`` rows, one per study of which series left a pulled folder (``where``:
    its destination and cache_id), study and patient as the pulls that copied them into this
    folder named them (one row without for series pulled before pulls were audited)."""
    from sqlalchemy import or_, select

    from dicom_node import audit
    from dicom_node.models import AuditEvent

    copied: dict[str, tuple[str | None, str]] = {}  # series -> (study, patient) as this folder's pulls recorded them
    here = AuditEvent.detail["destination"].as_string() == where["destination"]
    if where["cache_id"]:  # or as pulls into it recorded it before it moved here
        here = or_(here, AuditEvent.detail["cache_id"].as_string() == where["cache_id"])
    for row in session.scalars(select(AuditEvent).where(AuditEvent.action == audit.DATA_PULLED, here)):
        for series_uid in row.detail.get("series", []):
            copied[series_uid] = (row.study_instance_uid, row.detail.get("patient_id", ""))
    gone: dict[tuple[str | None, str] | None, list[str]] = {}
    for series_uid in removed:
        gone.setdefault(copied.get(series_uid), []).append(series_uid)
    for subject, series in gone.items():
        study_uid, patient_id = subject or (None, None)
        session.add(audit.event(audit.PULLED_DATA_REMOVED, "success", actor, study_uid=study_uid, series=series, why=why,
                                **({"patient_id": patient_id} if patient_id else {}), **where))


@app.command("pull-pairs")
def pull_pairs(
    url: Annotated[str, typer.Option(help="DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web")],
    out: Annotated[Path, typer.Option(help="folder for the DICOM files (what `mr2ct evaluate --pairs` reads)")],
    body_part: Annotated[Optional[str], typer.Option()] = None,
    mr_description: Annotated[Optional[str], typer.Option(help="regex on the MR's SeriesDescription")] = None,
    ct_description: Annotated[Optional[str], typer.Option(help="regex on the CT's SeriesDescription")] = None,
    date_from: Annotated[Optional[str], typer.Option(help="YYYYMMDD")] = None,
    date_to: Annotated[Optional[str], typer.Option(help="YYYYMMDD")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="at most this many patients")] = None,
    username: Annotated[Optional[str], typer.Option(envvar="MR2CT_PACS_USERNAME")] = None,
    password: Annotated[Optional[str], typer.Option(envvar="MR2CT_PACS_PASSWORD")] = None,
    attempts: PacsAttempts = 5,
    prune: Annotated[bool, typer.Option("--prune", help="delete the series folders the PACS no longer holds")] = False,
    record: RecordPull = True,
    config: ConfigOption = None,
) -> None:
    """Fetch the MR and CT series (and spatial registrations) of patients who have both from a DICOMweb PACS, to score a model on them with `mr2ct evaluate --pairs` (resumable)."""
    from training.pacs_pull import PairsFilter, pull_pairs as run_pull_pairs

    _logging()
    for option, pattern in (("--mr-description", mr_description), ("--ct-description", ct_description)):
        _check_regex(option, pattern)
    _check_dates(date_from, date_to)
    _output_folder("--out", out)
    flt = PairsFilter(body_part, mr_description, ct_description, date_from, date_to, limit)
    counts = _audited_pull(record, config, "pull-pairs", url, out, lambda fetched, removed: run_pull_pairs(
        url, out, flt, username=username, password=password, attempts=attempts, prune=prune, fetched=fetched, removed=removed))
    if counts["patients"] == 0:
        pruned = f" (removed {counts['removed']} series folder(s) the PACS no longer holds)" if counts["removed"] else ""
        pruned += f" (not taken: {counts['withdrawn']} patient(s) withdrawn from this folder by mr2ct forget)" if counts["withdrawn"] else ""
        typer.echo(f"mr2ct: no patient on the PACS has both an MR and a CT series matching these filters{pruned}", err=True)
        raise typer.Exit(2)
    typer.echo(f"{counts['patients']} patient(s) with MR and CT: {counts['found']} series, fetched {counts['fetched']}, "
               f"already there {counts['skipped']}"
               + (f", fetched again {counts['changed']} of which the PACS now holds another number of instances" if counts["changed"] else "")
               + (f", removed {counts['removed']} the PACS no longer holds" if prune else "")
               + (f", not taken {counts['withdrawn']} patient(s) withdrawn (mr2ct forget)" if counts["withdrawn"] else "")
               + f" -> {out}\nscore a model on them: mr2ct evaluate --pairs {out}")


@tokens_app.command("create")
def tokens_create(
    role: Annotated[str, typer.Option(help="admin | auditor | requester (may only POST /synthesize: the token of Orthanc's \"Synthesize CT\" button)")],
    name: Annotated[str, typer.Option(help="who or what holds the token")] = "admin",
    config: ConfigOption = None,
) -> None:
    """Create a token; it is printed once and only its SHA-256 is stored."""
    from dicom_node.tokens import create_token
    from dicom_node.db import init_db

    settings = _settings(config)
    try:
        token = create_token(init_db(settings.database_url), role, name, actor=f"{_os_user()} (mr2ct tokens create)")
    except ValueError as exc:
        typer.echo(f"mr2ct: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(token)


@tokens_app.command("revoke")
def tokens_revoke(name: Annotated[str, typer.Option()], config: ConfigOption = None) -> None:
    """Revoke every token with this name; exit status 1 when none is active under it."""
    from dicom_node.tokens import revoke
    from dicom_node.db import init_db

    count = revoke(init_db(_settings(config).database_url), name, actor=f"{_os_user()} (mr2ct tokens revoke)")
    if not count:
        typer.echo(f"mr2ct: no active token is named {name!r} (mr2ct tokens list shows them)", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {count} token(s)")


@tokens_app.command("list")
def tokens_list(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per token")] = False,
    config: ConfigOption = None,
) -> None:
    """Every token: name, role, created, last used (to the minute) and revoked. The tokens
    themselves are not stored and cannot be shown."""
    import json

    from dicom_node.tokens import list_tokens
    from dicom_node.db import init_db

    tokens = list_tokens(init_db(_settings(config).database_url))
    if as_json:
        for token in tokens:
            typer.echo(json.dumps({k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in token.items()}))
        return

    def when(value: object) -> str:
        return value.strftime("%Y-%m-%d %H:%M UTC") if hasattr(value, "strftime") else "-"

    rows = [("id", "name", "role", "created", "last used", "revoked")]
    rows += [(str(t["id"]), str(t["name"]), str(t["role"]), when(t["created_at"]), when(t["last_used_at"]) if t["last_used_at"] else "never",
              when(t["revoked_at"])) for t in tokens]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


@audit_app.command("lineage")
def audit_lineage(
    patient_id: Annotated[str, typer.Option(help="the patient's ID as the PACS holds it")],
    as_json: Annotated[bool, typer.Option("--json", help="the answer of GET /audit/lineage, as JSON")] = False,
    config: ConfigOption = None,
) -> None:
    """Where one patient's images went for training: the studies pulled and where, the training runs
    that read them (or were fine-tuned from such a run), the models they made and whether the active
    one is among them (as GET /audit/lineage; the question is audited, the patient ID not copied)."""
    import getpass
    import json

    from dicom_node import audit
    from dicom_node.db import init_db
    from dicom_node.lineage import patient_lineage

    sessions = init_db(_settings(config).database_url)
    with sessions() as session:
        found = patient_lineage(session, patient_id)
    audit.record(sessions, "query", "success", f"{getpass.getuser()} (mr2ct audit lineage)", resource="audit/lineage", patient_filter=True,
                 pulls=len(found["pulls"]), runs=len(found["training_runs"]))
    if as_json:
        typer.echo(json.dumps(found))
        return
    if not found["pulls"]:
        typer.echo("no study of this patient was pulled out of a PACS by mr2ct (pull, pull-pairs) into this database's audit trail")
        return
    for pull in found["pulls"]:
        typer.echo(f"{pull['at']}  mr2ct {pull['command']}: study {pull['study_uid']} ({len(pull['series'])} series) from {pull['source']} "
                   f"into {pull['folder']}" + (f" (cache id {pull['cache_id']})" if pull["cache_id"] else "")
                   + (f"; deleted from there {pull['removed_at']} (--prune or mr2ct forget)" if pull["removed_at"] else ""))
    for run in found["training_runs"]:
        typer.echo(f"training run {run['run_id']} ({run['state']}, {run['started_at']}): {run['out_dir']}"
                   + (f", model {run['model_sha256'][:12]}" if run["model_sha256"] else ""))
    for model in found["models"]:
        typer.echo(f"registered model {model['id']} {model['name']} {model['sha256'][:12]}{' (active)' if model['active'] else ''}")
    if found["active_model_learned_from_patient"]:
        typer.echo("the active model learned from this patient's images")


@app.command("forget")
def forget(
    patient_id: Annotated[str, typer.Option(help="the patient's ID as the PACS holds it")],
    issuer: Annotated[list[str], typer.Option(help="an Issuer of Patient ID to forget the patient under besides those the pulls "
                                                   "recorded and none (repeat the option)")] = [],
    folder: Annotated[list[Path], typer.Option(help="a dataset cache or pull-pairs folder to forget the patient in besides those "
                                                    "the pulls recorded (one moved since; repeat the option)")] = [],
    config: ConfigOption = None,
) -> None:
    """A patient withdrew consent to research use: delete their series from every folder `mr2ct
    pull` and `pull-pairs` copied them into (as the audit trail's pulls name them, and --folder)
    and keep every later pull into those folders from taking them again, whatever the PACS holds.
    Each deletion is audited. Models already trained on them cannot unlearn: the training runs and
    models that did are listed (GET /audit/lineage), to be retrained without them. Exit 1 when a
    folder the pulls name is no longer where they copied into (moved: name it with --folder)."""
    from dicom_node import audit
    from dicom_node.db import init_db
    from dicom_node.lineage import patient_lineage
    from training.pacs_pull import cache_id, withdraw_patient

    sessions = init_db(_settings(config).database_url)
    with sessions() as session:
        found = patient_lineage(session, patient_id)
    issuers = ["", *issuer, *(p["issuer"] for p in found["pulls"] if p.get("issuer"))]
    recorded = {p["cache_id"] or p["folder"]: p for p in found["pulls"] if p["folder"]}  # one per folder, by what names it

    def identity(place: Path) -> str:  # what names a folder here: its cache id, else its path
        return cache_id(place) or str(place.resolve())

    places: dict[str, Path] = {}  # each folder once, however the pulls and --folder name it
    for extra in folder:
        if not extra.is_dir():
            typer.echo(f"error: --folder: {extra} is not a folder", err=True)
            raise typer.Exit(2)
        places.setdefault(identity(extra), extra)
    missing = []
    for name, pull in recorded.items():
        copied_into = Path(pull["folder"])
        if name in places:
            continue
        if copied_into.is_dir() and (pull["cache_id"] is None or cache_id(copied_into) == pull["cache_id"]):
            # a pull before 2026-12-07 recorded no cache id: named by its path, the same folder as a later pull's id
            places.setdefault(identity(copied_into), copied_into)
        else:
            missing.append(copied_into)
    actor = f"{_os_user()} (mr2ct forget)"
    why = "the patient withdrew consent to research use (mr2ct forget)"
    for place in places.values():
        try:
            removed = withdraw_patient(place, patient_id, issuers, why)
        except FileNotFoundError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
        where = {"destination": str(place.resolve()), "cache_id": cache_id(place), "command": "forget"}
        with sessions.begin() as session:
            if removed:
                _audit_removed(session, actor, where, removed, why)
            else:  # nothing of theirs there (now): the withdrawal itself still stands, and is recorded
                session.add(audit.event(audit.PULLED_DATA_REMOVED, "success", actor, patient_id=patient_id, series=[], why=why, **where))
        typer.echo(f"{place}: removed {len(removed)} series of the patient; later pulls into it do not take them again")
    for gone in missing:
        typer.echo(f"{gone}: not there any more (moved or deleted?): name it with --folder to forget the patient in it", err=True)
    if not places and not missing:
        typer.echo("no folder to forget the patient in: no pull into this database's audit trail copied them, and no --folder")
    for run in found["training_runs"]:
        typer.echo(f"training run {run['run_id']} ({run['out_dir']}) learned from the patient's images before: retrain without them")
    for model in found["models"]:
        typer.echo(f"registered model {model['id']} {model['name']} {model['sha256'][:12]}{' (active)' if model['active'] else ''} "
                   "learned from them")
    if missing:
        raise typer.Exit(1)


@audit_app.command("export")
def audit_export(
    resend_since: Annotated[Optional[str], typer.Option(help="send again every audit row from this time on (ISO 8601; no "
                                                                "offset: UTC), e.g. the history of a node the repository did not "
                                                                "yet receive, or what a repository lost")] = None,
    config: ConfigOption = None,
) -> None:
    """Where sending the audit trail to `audit_syslog` stands (as GET /audit/export); with
    --resend-since, move its position back so that the running node sends those rows (again)."""
    import json
    from datetime import datetime

    from dicom_node import atna
    from dicom_node.db import init_db
    from dicom_node.models import as_utc

    settings = _settings(config)
    if not settings.audit_syslog:
        typer.echo("mr2ct: audit_syslog is not set: the audit trail is sent nowhere", err=True)
        raise typer.Exit(1)
    sessions = init_db(settings.database_url)
    if resend_since is not None:
        try:
            since = datetime.fromisoformat(resend_since)
        except ValueError:
            typer.echo(f"mr2ct: --resend-since {resend_since!r} is not an ISO 8601 time", err=True)
            raise typer.Exit(2) from None
        since = as_utc(since)
        atna.rewind(sessions, settings.audit_syslog, since)
        typer.echo(f"the rows from {since.isoformat()} on are sent again to {settings.audit_syslog} by the running node")
    with sessions() as session:
        typer.echo(json.dumps(atna.status(session, settings.audit_syslog)))


@models_app.command("register")
def models_register(
    path: Annotated[Path, typer.Argument(help="a training run folder or a .safetensors file with its card")],
    name: Annotated[Optional[str], typer.Option()] = None,
    activate_now: Annotated[bool, typer.Option("--activate", help="make it the active model")] = False,
    config: ConfigOption = None,
) -> None:
    """Register a model (card checked against the weights; the run's per-epoch losses go into the database)."""
    from dicom_node.db import init_db
    from dicom_node.registry import activate, register
    from synthesis.errors import ModelMismatch

    sessions = init_db(_settings(config).database_url)
    try:
        row, outcome = register(sessions, path, name)
        if activate_now:
            activate(sessions, str(row.id))
    except (ModelMismatch, ValueError) as exc:
        typer.echo(f"mr2ct: {exc}", err=True)
        raise typer.Exit(2) from exc
    said = {"registered": f"registered ({len(row.losses)} epochs of losses)",
            "card-updated": "already registered; its card and metrics refreshed from the card file",
            "unchanged": "already registered; nothing changed"}[outcome]
    typer.echo(f"model {row.id} {row.name} sha256={row.sha256[:12]} {said}{'; active' if activate_now else ''}")


@models_app.command("set")
def models_set(
    path: Annotated[Path, typer.Argument(help="a training run folder or a .safetensors file with its card")],
    test_time_augmentation: Annotated[str, typer.Option(
        help="none | mirror | dihedral | dihedral-shift: inference averages the generator over 1, 4, 8 or 32 views of each slice")],
) -> None:
    """Change an inference option in a model's card (the weights and their SHA-256 stay; the card records the change)."""
    from synthesis.errors import ModelMismatch
    from synthesis.card import set_test_time_augmentation, weights_in

    weights = weights_in(path)
    try:
        card = set_test_time_augmentation(weights, test_time_augmentation)
    except (ModelMismatch, ValueError) as exc:
        typer.echo(f"mr2ct: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"{weights.name} sha256={card['sha256'][:12]}: test_time_augmentation={card['test_time_augmentation']}")


@models_app.command("list")
def models_list(config: ConfigOption = None) -> None:
    """Registered models, the active one marked with *."""
    from sqlalchemy import select

    from dicom_node.db import init_db
    from dicom_node.models import Evaluation, ModelVersion
    from synthesis.card import learned

    settings = _settings(config)
    with init_db(settings.database_url)() as session:
        latest = {}  # the newest evaluation on the hospital's own pairs of each model
        for e in session.scalars(select(Evaluation).order_by(Evaluation.id)):
            latest[e.model_sha256] = e
        registered = session.scalars(select(ModelVersion).order_by(ModelVersion.id)).all()
        for m in registered:
            e = latest.get(m.sha256)
            scored = (f"  own pairs: MAE {e.mae_hu:.1f} HU on {e.pairs} with {e.test_time_augmentation} views (evaluation {e.id}, {e.at:%Y-%m-%d})"
                      if e else "")
            said = learned(m.card or {})
            typer.echo(f"{'*' if m.active else ' '} {m.id:3d} {m.name:30s} {m.sha256[:12]} {m.architecture:8s} {m.registered_at:%Y-%m-%d %H:%M}"
                       f"{f'  learned: {said}' if said else ''}{scored}")
    if not any(m.active for m in registered):  # say what the node runs, rather than nothing
        typer.echo(f"{'no model registered' if not registered else 'none active'}: the node runs model_file {settings.model_file}; "
                   "`mr2ct models register RUN_FOLDER_OR_FILE` then `mr2ct models activate ID` to change it without a restart")


@models_app.command("activate")
def models_activate(key: Annotated[str, typer.Argument(help="id, name or SHA-256 prefix")], config: ConfigOption = None) -> None:
    """Make a registered model the one every worker uses from its next job on. Warns when the node's
    selection rules (the config's select_*) let through series the model's card says it never learned
    (a model trained on other contrasts, or another anatomy, than the one it replaces); with
    select_follow_model the selection follows the card instead, and says so."""
    from dicom_node.db import init_db
    from dicom_node.preflight import selection_against_card
    from dicom_node.registry import activate
    from synthesis.errors import ModelMismatch

    settings = _settings(config)
    try:
        row = activate(init_db(settings.database_url), key)
    except (ModelMismatch, ValueError) as exc:
        typer.echo(f"mr2ct: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"active: {row.id} {row.name} sha256={row.sha256[:12]}")
    learned, warnings = selection_against_card(row.card or {}, settings)
    for warning in warnings:
        typer.echo(f"warning: {warning} ({learned}; the node's selection is its config's, which this does not change; "
                   "select_follow_model = true makes it follow the active model's card)", err=True)
    if settings.select_follow_model:
        typer.echo(f"selection: from the next series on, {learned.partition('; ')[0]} (select_follow_model)")


@series_app.command("rejudge")
def series_rejudge(
    series_uids: Annotated[Optional[list[str]], typer.Argument(help="SeriesInstanceUIDs of series set aside")] = None,
    reason_code: Annotated[str | None, typer.Option(help="every series this rule set aside (GET /series?reason_code=)")] = None,
    since: Annotated[Optional[str], typer.Option(help="with --reason-code: only series last received since (ISO 8601; no offset: UTC)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="say what would happen, change nothing")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="the answer as JSON (POST /series/rejudge's)")] = False,
    config: ConfigOption = None,
) -> None:
    """Judge series the selection rules set aside again, by the rules as they stand now (the
    config's select_*, or with select_follow_model the active model's card): a job for each that
    passes, the reason again for each that does not (POST /series/rejudge does the same)."""
    import json
    from datetime import datetime

    from dicom_node.db import init_db
    from dicom_node.models import as_utc
    from dicom_node.registry import node_selection
    from dicom_node.worker import rejudge

    settings = _settings(config)
    sessions = init_db(settings.database_url)
    try:
        after = as_utc(datetime.fromisoformat(since)) if since else None
        answer = rejudge(sessions, node_selection(settings, sessions)(), "mr2ct series rejudge", series_uids or [], reason_code,
                         after, originals_from_orthanc=settings.originals_from == "orthanc", dry_run=dry_run)
    except ValueError as exc:  # a request that names nothing, a bad UID or rule, a time that is none
        typer.echo(f"mr2ct: {exc}", err=True)
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(json.dumps(answer, indent=2))
        return
    for item in answer["items"]:
        said = (f"job {item['job_id']}" if item.get("state") == "stable" else f"still set aside: {item['reason']}" if "state" in item
                else "would be synthesized" if item.get("would") == "synthesize"
                else f"would stay set aside: {item['reason']}" if "would" in item else f"not judged: {item['not_judged']}")
        typer.echo(f"{item['series_uid']}: {said}")
    typer.echo(f"dry run: {answer['would_synthesize']} would be synthesized, nothing changed" if dry_run
               else f"{answer['judged']} judged again, {answer['synthesized']} to be synthesized")


@spool_app.command("status")
def spool_status(config: ConfigOption = None) -> None:
    """What the spool holds, what retention deleted, and what it would delete now."""
    import shutil
    from datetime import timedelta

    from dicom_node.db import init_db
    from dicom_node.deferred import journal_counts
    from dicom_node.retention import due_for_purge, routing_rule, spool_usage

    settings = _settings(config)
    routing = routing_rule(settings.forward_originals, settings.forward_commitment)  # what retention waits for of a routed original
    sessions = init_db(settings.database_url)
    usage = spool_usage(sessions)
    typer.echo(f"spool {settings.spool_dir}: {usage['instances']} originals, {usage['bytes'] / 2**20:.1f} MiB; "
               f"{usage['purged_instances']} deleted by spool retention")
    if Path(settings.spool_dir).exists():
        typer.echo(f"free on its disk: {shutil.disk_usage(settings.spool_dir).free // 2**20} MiB "
                   f"(C-STORE refused below {settings.spool_min_free_mb} MiB, spool_min_free_mb)")
        waiting, aside = journal_counts(settings.spool_dir)
        if waiting or aside:
            typer.echo(f"journal: {waiting} entries kept while the database was away still to write, {aside} set aside "
                       "(mr2ct spool journal)")
    if settings.spool_retention_hours:
        due = due_for_purge(sessions, timedelta(hours=settings.spool_retention_hours), routing)
        typer.echo(f"spool_retention_hours {settings.spool_retention_hours:g}: {due['instances']} originals of {due['series']} "
                   f"series ({due['bytes'] / 2**20:.1f} MiB) are due now")
    else:
        typer.echo("spool_retention_hours 0: every original is kept")
    if settings.spool_failed_retention_hours:
        due = due_for_purge(sessions, None, routing, failed_retention=timedelta(hours=settings.spool_failed_retention_hours))
        typer.echo(f"spool_failed_retention_hours {settings.spool_failed_retention_hours:g}: {due['instances']} originals of "
                   f"{due['series']} failed or cancelled series ({due['bytes'] / 2**20:.1f} MiB) are due now")
    else:
        typer.echo("spool_failed_retention_hours 0: a failed or cancelled series' originals are kept until it is retried or sent again")
    if routing == "committed":
        from dicom_node.forward_commitment import status

        held = status(sessions)
        typer.echo(f"forward_commitment: {held['committed']} routed originals committed by {settings.forward_to}; kept until it "
                   f"commits them: {held['awaiting_report']} awaiting its report, {held['not_asked']} not asked yet"
                   + (f" (last error: {held['last_error']})" if held["last_error"] else ""))


@spool_app.command("journal")
def spool_journal(
    retry: Annotated[bool, typer.Option("--retry", help="write the entries set aside now (once what the database refused is mended)")] = False,
    take_over: Annotated[Optional[str], typer.Option(
        "--take-over", metavar="HOST",
        help="write the waiting entries of HOST, a host that shared this spool_dir and runs no node any more (retired or renamed); "
        "only when no mr2ct process runs there")] = None,
    config: ConfigOption = None,
) -> None:
    """The SCP's journal: rows it kept while the database was away (refusals, associations, their
    audit rows), waiting to be written, and any the database then refused, set aside."""
    from dicom_node.deferred import entry_host, listed, retry_set_aside, take_over_host

    settings = _settings(config)
    if retry or take_over is not None:
        from dicom_node.db import init_db

        if retry and take_over is not None:
            raise typer.BadParameter("--retry and --take-over: one at a time", param_hint="--take-over")
        if take_over is not None:
            try:
                written, failed = take_over_host(settings.spool_dir, init_db(settings.database_url), take_over)
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint="--take-over") from exc
            typer.echo(f"written {written} waiting entr{'y' if written == 1 else 'ies'} of {take_over}")
        else:
            written, failed = retry_set_aside(settings.spool_dir, init_db(settings.database_url))
            typer.echo(f"written {written} set-aside entr{'y' if written == 1 else 'ies'}")
        for name, why in failed:
            typer.echo(f"not written {name}: {why}", err=True)
        if failed:
            raise typer.Exit(1)
        return
    found = listed(settings.spool_dir)
    aside = sum(path.name.endswith(".bad") for path, _ in found)
    typer.echo(f"journal {Path(settings.spool_dir) / '.deferred'}: {len(found) - aside} waiting for the database, {aside} set aside"
               + (" (mr2ct spool journal --retry writes them)" if aside else ""))
    for path, entry in found:
        state = "set aside" if path.name.endswith(".bad") else "waiting"
        if entry is None:
            typer.echo(f"{state:9}  {path.name}: unreadable")
            continue
        audit_row = entry.get("audit") or {}
        what = audit_row.get("action", "?") + (" + the refusal its series waits for" if entry.get("refusal") else "") + (
            " + the association's row" if entry.get("association") else "")
        typer.echo(f"{state:9}  {entry.get('at', '?')}  {what}  {audit_row.get('actor', '')}  series={audit_row.get('series_uid') or '-'}"
                   f"  host={entry_host(path.name) or '?'}")


@spool_app.command("purge")
def spool_purge(
    older_than_hours: Annotated[Optional[float], typer.Option(help="delete originals older than this (default: spool_retention_hours)")] = None,
    failed_older_than_hours: Annotated[Optional[float], typer.Option(
        help="also delete a failed or cancelled series' originals this long after its job ended, and those of a series set aside for a "
        "refused instance this long after they arrived (default: spool_failed_retention_hours)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="say what would be deleted, delete nothing")] = False,
    config: ConfigOption = None,
) -> None:
    """Delete the originals no longer needed now, by the rules of spool retention (a job done or
    the series ignored, routed when routing; a job failed, with --failed-older-than-hours); for a
    node run without spool retention."""
    from datetime import timedelta

    from dicom_node.db import init_db
    from dicom_node.retention import due_for_purge, purge_spool, routing_rule

    settings = _settings(config)
    routing = routing_rule(settings.forward_originals, settings.forward_commitment)
    hours = settings.spool_retention_hours if older_than_hours is None else older_than_hours
    failed_hours = settings.spool_failed_retention_hours if failed_older_than_hours is None else failed_older_than_hours
    if hours < 0 or failed_hours < 0 or not (hours or failed_hours):
        typer.echo("mr2ct: give --older-than-hours or --failed-older-than-hours (> 0), or set spool_retention_hours", err=True)
        raise typer.Exit(2)
    retention = timedelta(hours=hours) if hours else None
    failed = timedelta(hours=failed_hours) if failed_hours else None
    sessions = init_db(settings.database_url)
    if dry_run:
        due = due_for_purge(sessions, retention, routing, failed_retention=failed)
        typer.echo(f"would delete {due['instances']} originals of {due['series']} series ({due['bytes'] / 2**20:.1f} MiB)")
        return
    done = purge_spool(sessions, settings.spool_dir, retention, routing, actor="mr2ct spool purge", failed_retention=failed)
    typer.echo(f"deleted {done['instances']} originals of {done['series']} series ({done['bytes_freed'] / 2**20:.1f} MiB)"
               + (f", {done['failed_instances']} of them of failed or cancelled series" if done["failed_instances"] else "")
               + (f"; kept {done['kept_resent']} sent again since" if done["kept_resent"] else "")
               + (f"; left {done['outside_spool']} alone whose recorded paths are not under spool_dir" if done["outside_spool"] else ""))


def main() -> None:
    """The ``mr2ct`` command (and ``python -m dicom_node.cli``): the app, then a quick exit."""
    try:
        app()
    except SystemExit as done:
        _leave(done.code)
        raise


def _leave(code: object) -> None:
    """Leave once a command has finished (its files, database rows and audit written): every
    pooled database connection closed (PostgreSQL sees each session end, SQLite folds its
    write-ahead log back), the exit handlers run (logging's flush among them), then the process
    ends with ``code`` without the interpreter's teardown of torch's modules, which wrote nothing
    and took 1.2-1.5 s of every command that loaded torch on 2 cores (each node stop, a rolling
    restart, each `mr2ct train` of a test). With a thread still running that the normal exit would
    wait for (not a daemon), the normal exit."""
    import atexit
    import threading

    if any(t is not threading.main_thread() and not t.daemon for t in threading.enumerate()):
        return
    if "dicom_node.db" in sys.modules:
        from dicom_node.db import close_engines

        close_engines()
    atexit._run_exitfuncs()
    if code is not None and not isinstance(code, int):  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    main()
