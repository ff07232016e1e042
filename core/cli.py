"""The ``b24sms`` command: serve, worker, providers, portals, messages, plugins, db, demo."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from . import __version__

if TYPE_CHECKING:
    from .service import Service

#: the plugin manager main() loaded (None: the service loads its own)
_plugin_manager: Any = None


class Context:
    """Builds the service lazily, so ``--help`` works without a config."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._service: Service | None = None

    @property
    def service(self) -> Service:
        if self._service is None:
            from . import logs
            from .config import ConfigError, load_config, prepare_instance
            from .plugins import PluginError
            from .service import Service

            try:
                config = prepare_instance(load_config(self.config_path))
                logs.configure(config.service)
                # The plugins main() loaded for their commands serve the service too.
                self._service = Service(config, plugin_manager=_plugin_manager)
            except (ConfigError, PluginError) as exc:
                raise click.ClickException(str(exc)) from None
        return self._service


pass_ctx = click.make_pass_decorator(Context)


@click.group()
@click.version_option(__version__, prog_name="b24sms")
@click.option(
    "--config",
    "config_path",
    envvar="B24SMS_CONFIG",
    type=click.Path(dir_okay=False),
    help="TOML config (default: $B24SMS_CONFIG or the built-in default.toml).",
)
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """b24sms: the Bitrix24 SMS provider service."""
    ctx.obj = Context(config_path)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--threads", default=None, type=int, help="Web server threads (config: threads).")
@click.option(
    "--consumer/--no-consumer",
    default=None,
    help="Run queue workers inside this process (default: yes for a SQLite or memory queue).",
)
@pass_ctx
def serve(obj: Context, host: str, port: int, threads: int | None, consumer: bool | None) -> None:
    """Run the web service (waitress), with an embedded queue consumer."""
    import waitress

    from .app import build_app

    svc = obj.service
    app = build_app(service=svc)
    if consumer is None:
        consumer = svc.settings.queue_url.startswith(("sqlite", "memory"))
    embedded = svc.queue.start_embedded(svc.settings.workers) if consumer else None
    click.echo(
        f"b24sms {__version__} serving on http://{host}:{port} "
        f"(public URL {svc.public_url}; consumer {'on' if embedded else 'off'})"
    )
    try:
        waitress.serve(
            app, host=host, port=port, threads=threads or svc.settings.threads, ident="b24sms"
        )
    finally:
        if embedded is not None:
            embedded.stop()
        svc.close()


@cli.command()
@click.option("--workers", "-w", default=None, type=int, help="Worker threads (config: workers).")
@click.option("--no-periodic", is_flag=True, help="Do not run the sweep in this process.")
@pass_ctx
def worker(obj: Context, workers: int | None, no_periodic: bool) -> None:
    """Run a queue consumer only (for separate machines)."""
    svc = obj.service
    svc.queue.run_consumer(workers=workers or svc.settings.workers, periodic=not no_periodic)


@cli.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@pass_ctx
def db_upgrade(obj: Context, revision: str) -> None:
    """Apply the Alembic migrations."""
    from . import schema

    schema.upgrade(obj.service.db, revision)
    click.echo(f"database at revision {schema.current_revision(obj.service.db)}")


@cli.group()
def providers() -> None:
    """Provider CODEs and their registration on portals."""


@providers.command("list")
@pass_ctx
def providers_list(obj: Context) -> None:
    """Configured providers and where they are registered."""
    from sqlalchemy import select

    from .models import Portal, ProviderRegistration

    svc = obj.service
    with svc.db.read() as session:
        rows = session.execute(
            select(
                ProviderRegistration, Portal.domain, Portal.reconciled_at, Portal.reconcile_error
            ).join(Portal)
        ).all()
    by_code: dict[str, list[str]] = {}
    for registration, domain, reconciled_at, reconcile_error in rows:
        note = registration.state + (
            f": {registration.last_error}" if registration.last_error else ""
        )
        note += f"; reconciled {f'{reconciled_at:%Y-%m-%d %H:%M}' if reconciled_at else 'never'}"
        note += f"; last error: {reconcile_error}" if reconcile_error else ""
        by_code.setdefault(registration.code, []).append(f"{domain} ({note})")
    for code, provider in svc.providers.items():
        state = "enabled" if provider.enabled else "disabled"
        click.echo(f"{code}  plugin={provider.plugin}  {state}  name={provider.name!r}")
        for line in by_code.get(code, []) or ["(not registered on any portal)"]:
            click.echo(f"    {line}")


@providers.command("sync")
@click.option("--portal", "member_id", default=None, help="Only this member_id.")
@pass_ctx
def providers_sync(obj: Context, member_id: str | None) -> None:
    """Reconcile every active portal's providers with the config."""
    from .registration import sync_all, sync_portal

    svc = obj.service
    if member_id:
        from .portals import find_portal

        with svc.db.session() as session:
            portal = find_portal(session, member_id)
            portal_id = portal.id if portal is not None else None
        if portal_id is None:
            raise click.ClickException(f"no portal with member_id {member_id}")
        reports = [sync_portal(svc, portal_id)]
    else:
        reports = sync_all(svc)
    failed = False
    for report in reports:
        click.echo(str(report))
        failed = failed or not report.ok
    if not reports:
        click.echo("no active portals")
    if failed:
        sys.exit(1)


@cli.group()
def portals() -> None:
    """Installed portals."""


@portals.command("list")
@pass_ctx
def portals_list(obj: Context) -> None:
    """Portals, their state and message counts (never their tokens)."""
    from sqlalchemy import func, select

    from .models import Message, Portal

    # Read transactions (Database.read): a listing never holds up the service's writes.
    with obj.service.db.read() as session:
        counts = dict(
            session.execute(
                select(Message.portal_id, func.count()).group_by(Message.portal_id)
            ).all()
        )
        for portal in session.scalars(select(Portal).order_by(Portal.id)):
            click.echo(
                f"{portal.member_id}  {portal.domain}  {portal.state}  "
                f"messages={counts.get(portal.id, 0)}  "
                f"installed={portal.installed_at:%Y-%m-%d %H:%M}  "
                f"events={portal.event_bindings or 'none'}"
                + (f"  payment={portal.payment_state}" if portal.payment_state else "")
                + (f"  last_error={portal.last_error}" if portal.last_error else "")
            )


@portals.command("rotate-key")
@click.argument("member_id")
@pass_ctx
def portals_rotate_key(obj: Context, member_id: str) -> None:
    """New HANDLER keys for one portal; the old ones stop working once its providers are synced.

    The new key version is stored, then the portal's providers are registered with the new
    URLs; when that sync fails, the old keys keep working until `b24sms providers sync` succeeds.
    """
    from .portals import find_portal
    from .registration import sync_portal

    service = obj.service
    with service.db.session() as session:
        portal = find_portal(session, member_id, lock=True)
        if portal is None:
            raise click.ClickException(f"no portal {member_id!r}")
        portal.handler_key_version += 1
        portal_id, version = portal.id, portal.handler_key_version
    report = sync_portal(service, portal_id)
    if not report.ok:
        click.echo(f"{member_id}: key version {version} stored; provider sync failed: {report}")
        click.echo("the old keys keep working until `b24sms providers sync` succeeds")
        sys.exit(1)
    click.echo(f"{member_id}: HANDLER keys rotated to version {version}; older keys refused")


@cli.command()
@click.option("--status", default=None, help="Only this status.")
@click.option("--code", default=None, help="Only this provider CODE.")
@click.option("--portal", "member_id", default=None, help="Only this member_id.")
@click.option("--limit", default=20, show_default=True, type=int)
@pass_ctx
def messages(
    obj: Context, status: str | None, code: str | None, member_id: str | None, limit: int
) -> None:
    """Recent messages, newest first (numbers masked, bodies never shown)."""
    from sqlalchemy import select

    from .logs import mask_number
    from .models import Message, Portal

    query = select(Message, Portal.domain).join(Portal).order_by(Message.id.desc()).limit(limit)
    if status:
        query = query.where(Message.status == status)
    if code:
        query = query.where(Message.code == code)
    if member_id:
        query = query.where(Portal.member_id == member_id)
    with obj.service.db.read() as session:
        for message, domain in session.execute(query):
            click.echo(
                f"{message.created_at:%Y-%m-%d %H:%M:%S}  {message.message_id}  {message.code}  "
                f"{domain}  {mask_number(message.to or message.to_raw)}  {message.status}  "
                f"attempts={message.attempts}"
                + (f"  error={message.last_error}" if message.last_error else "")
            )


@cli.command()
@click.option("--dry-run", is_flag=True, help="Only count what would be redacted and deleted.")
@pass_ctx
def purge(obj: Context, dry_run: bool) -> None:
    """Apply [retention] now: redact and delete old final messages, finish erasing portals
    uninstalled with CLEAN (in small batches, beside the running service)."""
    from .retention import pending, run

    svc = obj.service
    settings = svc.config.retention
    click.echo(
        f"retention: redact after {settings.redact_after_days or 'never'} days, "
        f"delete after {settings.delete_after_days or 'never'} days (final messages only)"
    )
    if dry_run:
        click.echo(f"would have: {pending(svc.db, settings)}")
        return
    click.echo(f"done: {run(svc.db, settings)}")


@cli.command()
@pass_ctx
def plugins(obj: Context) -> None:
    """Discovered plugins, their versions, gateway types and the CODEs that use them."""
    from .plugins import plugin_versions

    svc = obj.service
    types_by_plugin: dict[str, list[str]] = {}
    for gtype in svc.gateway_types.values():
        codes = [c for c, p in svc.providers.items() if p.plugin == gtype.name]
        types_by_plugin.setdefault(gtype.plugin, []).append(
            f"{gtype.name} (codes: {', '.join(codes) or '-'})"
        )
    for name, dist, version in plugin_versions(svc.pm):
        click.echo(
            f"{name}  {dist} {version}  gateways: {'; '.join(types_by_plugin.get(name, [])) or '-'}"
        )


@cli.group()
def keys() -> None:
    """Encryption keys of the secrets at rest (docs/operations.md)."""


@keys.command("generate")
def keys_generate() -> None:
    """Print a new random key for [service] encryption_keys."""
    from .crypto import generate_key

    click.echo(generate_key())


@keys.command("rotate")
@click.option(
    "--batch-size",
    default=200,
    show_default=True,
    type=click.IntRange(1, 10_000),
    help="Rows re-encrypted per transaction.",
)
@click.option("--check", is_flag=True, help="Only count what would be re-encrypted; exit 1 if any.")
@pass_ctx
def keys_rotate(obj: Context, batch_size: int, check: bool) -> None:
    """Re-encrypt every stored secret with the first key of encryption_keys.

    Rows already under the first key are left alone, so running it again is safe; it exits 1
    when a stored secret opens with none of the configured keys.
    """
    from .crypto import rotate_stored_secrets
    from .models import Base

    svc = obj.service
    report = rotate_stored_secrets(
        svc.db.engine,
        Base.metadata,
        svc.keys,
        batch_size=batch_size,
        transaction=svc.db.connection,
        dry_run=check,
    )
    click.echo(f"first key {report.key_id} ({len(svc.keys.ids)} configured)")
    for column in report.columns:
        click.echo("  " + column.describe("to re-encrypt" if check else "re-encrypted"))
    pending = sum(column.rotated for column in report.columns)
    if not report.ok or (check and pending):
        sys.exit(1)


@cli.command()
@click.option("--to", "number", default="+14155550123", show_default=True)
@click.option("--text", default="Your code: 1234", show_default=True)
def demo(number: str, text: str) -> None:
    """The whole flow against the bundled portal emulator, printed as a timeline."""
    from .demo import run_demo

    sys.exit(run_demo(number, text, echo=click.echo))


@cli.command("new-plugin")
@click.argument("name")
@click.option(
    "--directory",
    "-d",
    "parent",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where to write the package's directory.",
)
def new_plugin(name: str, parent: Path) -> None:
    """Write a new gateway plugin package b24sms-NAME whose tests pass as written.

    NAME is the carrier's name (``acme``): the plugin's name, the distribution ``b24sms-acme``
    and the module ``b24sms_acme``. A bad name exits with 2, an existing directory with 1.
    """
    from .scaffold import ScaffoldError, plugin_names, write_plugin

    try:
        plugin_names(name)
    except ScaffoldError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from None
    try:
        root = write_plugin(name, parent)
    except ScaffoldError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {root}")
    click.echo(f"next: pip install -e '{root}[test]' && (cd {root} && pytest)")


def main() -> None:
    """Console-script entry point."""
    from .plugins import make_plugin_manager

    global _plugin_manager
    try:
        _plugin_manager = make_plugin_manager()
        _plugin_manager.hook.b24sms_register_commands(cli=cli)
    except Exception as exc:  # noqa: BLE001 - a broken plugin must not take the CLI down
        _plugin_manager = None
        click.echo(f"warning: plugin commands not loaded: {exc}", err=True)
    cli()
