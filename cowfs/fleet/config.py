"""The user's remotes: $XDG_CONFIG_HOME/cowfs/remotes.json (default ~/.config/cowfs), 0600.

A remote is a name, an `s3://BUCKET/PREFIX` URL, the etcd endpoints of its references and
optionally an S3 endpoint URL (for SeaweedFS, Ceph: AWS_ENDPOINT_URL_S3 does the same).
Credentials are never stored here: boto3 reads them from AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_PROFILE and ~/.aws/, as every AWS tool does.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path

from cowfs.blob.base import check_name
from cowfs.fleet import FleetError

_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class RemoteConfig:
    name: str
    url: str            # s3://BUCKET[/PREFIX]
    refs: str           # etcd endpoints, comma-separated http(s)://HOST:PORT
    endpoint: str | None = None

    @property
    def bucket(self) -> str:
        return parse_s3_url(self.url)[0]

    @property
    def prefix(self) -> str:
        return parse_s3_url(self.url)[1]


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "cowfs"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cowfs"


def config_file() -> Path:
    return config_dir() / "remotes.json"


def check_remote_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise FleetError(f"bad remote name {name!r}: letters, digits, '.', '_', '-', at most 64, "
                         "not starting with '.'")
    return name


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of s3://BUCKET[/PREFIX]; FleetError saying what is wrong."""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "s3" or not u.netloc or u.query or u.fragment:
        raise FleetError(f"bad remote URL {url!r}: expected s3://BUCKET/PREFIX")
    if not _BUCKET.fullmatch(u.netloc) or ".." in u.netloc:
        raise FleetError(f"bad bucket name {u.netloc!r} in {url!r}: 3-63 lower-case letters, digits, "
                         "'.' and '-'")
    prefix = u.path.strip("/")
    if prefix:
        try:
            check_name(prefix)
        except ValueError:
            raise FleetError(f"bad prefix {prefix!r} in {url!r}: '/'-separated segments of letters, "
                             "digits and ._=- (not starting with '.')") from None
    return u.netloc, prefix


def parse_endpoints(refs: str, what: str = "--refs") -> str:
    """refs as a normalised comma-separated list of http(s)://HOST:PORT."""
    out = []
    for part in refs.split(","):
        u = urllib.parse.urlsplit(part.strip())
        try:
            port = u.port
        except ValueError:
            port = None
        if u.scheme not in ("http", "https") or not u.hostname or port is None or u.path not in ("", "/"):
            raise FleetError(f"bad {what} endpoint {part.strip()!r}: expected http://HOST:PORT")
        out.append(f"{u.scheme}://{u.netloc}")
    return ",".join(out)


def load() -> dict[str, RemoteConfig]:
    path = config_file()
    try:
        doc = json.loads(path.read_text())
        return {name: RemoteConfig(name=name, **fields) for name, fields in doc.get("remotes", {}).items()}
    except FileNotFoundError:
        return {}
    except (ValueError, TypeError, AttributeError) as e:
        raise FleetError(f"{path}: not a remotes file cowfs can read ({e}); fix or remove it") from None


def get(name: str) -> RemoteConfig:
    remotes = load()
    if name not in remotes:
        known = ", ".join(sorted(remotes)) or "none"
        raise FleetError(f"no remote named {name!r} (known: {known}; add one with cowfs remote add)")
    return remotes[name]


def _save(remotes: dict[str, RemoteConfig]) -> None:
    d = config_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    doc = {"remotes": {n: {k: v for k, v in asdict(r).items() if k != "name" and v is not None}
                       for n, r in sorted(remotes.items())}}
    fd, tmp = tempfile.mkstemp(prefix=".remotes-", dir=d)
    try:
        with os.fdopen(fd, "w") as f:      # mkstemp: 0600
            json.dump(doc, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, config_file())
    except BaseException:
        os.unlink(tmp)
        raise


def add(name: str, url: str, refs: str, endpoint: str | None = None) -> RemoteConfig:
    check_remote_name(name)
    parse_s3_url(url)
    r = RemoteConfig(name, url, parse_endpoints(refs),
                     parse_endpoints(endpoint, "--endpoint") if endpoint else None)
    remotes = load()
    if name in remotes:
        raise FleetError(f"a remote named {name!r} exists already ({remotes[name].url}); "
                         "remove it first with cowfs remote remove")
    remotes[name] = r
    _save(remotes)
    return r


def remove(name: str) -> RemoteConfig:
    r = get(name)
    remotes = load()
    del remotes[name]
    _save(remotes)
    return r
