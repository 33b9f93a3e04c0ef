"""What data a run read, by content: every manifest's bytes and the media files its records name.

`check_and_record` runs when the manifests are loaded (runtime/preflight.py) and writes
`<out>/data.json`: for each manifest flag, its path, the SHA-256 of its bytes and, per record
(by id), a digest of its line and the size and modification time of each file it names (video,
audio, cache). A stat per file, not a read, so a 2,000-clip manifest takes tens of milliseconds.
On --resume the manifests read now are compared with those recorded under the same path (a flag
given another path is rundir's business): a manifest rewritten in place or a medium replaced or
touched is named, with how many records and media changed, and the run refuses unless
--allow_changed_data. Copying a data set without its modification times counts as a change.
"""

import hashlib
import json
import os
from pathlib import Path

from corpora.records import read_lines

FILE = "data.json"
MEDIA = ("video", "audio", "cache")
# changed media files named in a message
SHOWN = 3


def fingerprint(path, manifest):
    """{"path", "sha256" of the file's bytes, "records": {id: [line digest, {kind: [size,
    mtime_ns]}]}} of a manifest and its loaded records (data.Manifest)."""
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    lines = read_lines(path)
    records = {}
    for rec in manifest:
        # source is "file:line"
        n = int(rec["source"].rsplit(":", 1)[1])
        line = hashlib.blake2b(lines[n - 1], digest_size=8).hexdigest()
        records[rec["id"]] = [line, media_stats(rec)]
    return {"path": str(path), "sha256": digest, "records": records}


def media_stats(rec):
    """{kind: [size, mtime_ns]} of each file a record names ([None, None]: gone)."""
    stats = {}
    for kind in MEDIA:
        if kind not in rec:
            continue
        try:
            info = os.stat(rec[kind])
            stats[kind] = [info.st_size, info.st_mtime_ns]
        except OSError:
            stats[kind] = [None, None]
    return stats


def difference(recorded, now, manifest):
    """What changed from the fingerprint `recorded` to `now` of one manifest path (`manifest`:
    its records now), in words; None when nothing did."""
    if recorded["sha256"] == now["sha256"] and recorded["records"] == now["records"]:
        return None
    old, new = recorded["records"], now["records"]
    added = [i for i in new if i not in old]
    removed = [i for i in old if i not in new]
    common = [i for i in new if i in old]
    lines = [i for i in common if old[i][0] != new[i][0]]
    # media of an unchanged line: a line that changed may name other media anyway
    touched = [i for i in common if old[i][0] == new[i][0] and old[i][1] != new[i][1]]
    parts = []
    if lines or added or removed:
        parts.append(
            f"{len(lines)} records changed, {len(added)} added, {len(removed)} removed "
            f"(of {len(old)})"
        )
    if touched:
        by_id = {rec["id"]: rec for rec in manifest}
        files = []
        for i in touched:
            for kind, stat in new[i][1].items():
                if old[i][1].get(kind) != stat:
                    files.append(by_id[i][kind])
        shown = ", ".join(files[:SHOWN]) + (", ..." if len(files) > SHOWN else "")
        parts.append(
            f"{len(files)} media files of {len(touched)} records changed size or modification "
            f"time ({shown})"
        )
    if not parts:
        parts.append("its bytes changed, no record did (blank or skipped lines)")
    return "; ".join(parts)


def check_and_record(out, manifests, resume, allow):
    """For {flag: (path, data.Manifest)} read by a run in `out`: on `resume`, compare with
    `<out>/data.json`; then write it anew. Returns ({flag: what changed}, a refusal or None); a
    refused run leaves data.json as it was. `allow`: --allow_changed_data."""
    now = {flag: fingerprint(path, manifest) for flag, (path, manifest) in manifests.items()}
    record = Path(out) / FILE
    changed = {}
    if resume and record.exists():
        try:
            recorded = json.loads(record.read_text())["manifests"]
        except (OSError, ValueError, KeyError) as err:
            return {}, f"{record}: unreadable ({err}); move it away to resume without the check"
        for flag, (path, manifest) in manifests.items():
            before = recorded.get(flag)
            if before is None or before["path"] != str(path):
                continue
            what = difference(before, now[flag], manifest)
            if what:
                changed[flag] = f"{path}: {what}"
    listed = "\n  ".join(f"{flag} {what}" for flag, what in changed.items())
    if changed and not allow:
        return changed, (
            f"--resume on data that changed since the run started ({record}):\n  {listed}\n"
            "resume on the data the run started with, or pass --allow_changed_data to go on "
            "with this data"
        )
    if changed:
        print(f"train.py: resumed on changed data (--allow_changed_data):\n  {listed}")
    tmp = record.with_name(FILE + ".tmp")
    tmp.write_text(json.dumps({"manifests": now}))
    os.replace(tmp, record)
    return changed, None
