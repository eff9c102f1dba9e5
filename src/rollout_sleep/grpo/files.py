"""Dataset files, read before and beside ``datasets.load_dataset``: what it cannot read, named by file, line and
fix (not UTF-8, a line that is not JSON, a CSV row with other fields, a repeated key or header), and what it would
hand a reward changed (:func:`value_changes`: ``"007"`` read as 7, ``12`` as ``12.0``, ``NA`` as no value)."""

from __future__ import annotations

from pathlib import Path


def mixed_column_problem(ds) -> str | None:
    """Why a column of plain values (no lists or mappings) holds several types (text in some rows, numbers or
    booleans in others), or ``None``. datasets reads such a column as JSON (its ``Json`` feature) and decodes text
    that looks like a number: ``"007"`` comes back as ``7``, and nothing can tell them apart afterwards, so a reward
    comparing answers would score changed values silently. Columns of lists or mappings are left as they are."""
    for name, feature in ds.features.items():
        if type(feature).__name__ != "Json":
            continue
        kinds: dict[str, int] = {}  # the type of each value, with the first row holding it
        for i, value in enumerate(ds[name]):
            if isinstance(value, (list, dict)):
                break
            if value is not None:
                kinds.setdefault(type(value).__name__, i)
        else:
            seen = ", ".join(f"{k} (e.g. row {i})" for k, i in sorted(kinds.items(), key=lambda kv: kv[1]))
            return (f"column {name!r} holds values of several types in the file (text in some rows, numbers or "
                    f"booleans in others; as datasets decoded them: {seen}, rows counted from 0): datasets reads such "
                    f"a column as JSON and turns text that looks like a number into one (\"007\" becomes 7), "
                    f"silently. Give the column one type in every row: quote every value as text (\"{name}\": "
                    f"\"7\") or write every value as a number")
    return None


def _json_rows(path: Path):
    """``(line, row)`` for each object of a JSON Lines file, or of a JSON file (one array, or one object per
    line); rows that are not objects are skipped (the loader names them)."""
    import json

    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        rows = json.loads(text)
        return [(None, r) for r in rows if isinstance(r, dict)]
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if isinstance(row, dict):
                out.append((number, row))
    return out


_DATASET_META = ("dataset_info.json", "state.json", "dataset_dict.json")  # datasets' own files beside the data


def value_changes(source: str, prompt_column: str = "prompt") -> dict[str, str]:
    """Column -> why its values would not reach a reward as the files hold them (the first cell found), for a
    local dataset: datasets and pandas change some values without a word, and a reward comparing answers as text
    then scores a correct completion 0, silently. JSON / JSON Lines: whole numbers beside fractional ones (``12``
    comes back ``12.0``), text beside numbers or booleans beside numbers across a folder's files (``"007"`` comes
    back ``7``). CSV: a cell pandas parses into another value (``02108`` -> 2108, ``12`` -> 12.0 in a column of
    floats) or reads as missing (``NA``, ``None``, ``null``), chunk by chunk as datasets reads it. The recipe
    refuses the columns a reward reads and the prompt, and warns about the others. ``prompt_column`` is named
    ``prompt``, as :func:`load_prompts` renames it."""
    path = Path(source).expanduser()
    if source == "synthetic" or not path.exists():
        return {}
    files = _text_files(path)
    out = _json_type_changes(files)
    for column, why in _parquet_type_changes(path).items():
        out.setdefault(column, why)
    for f in files:
        if f.suffix.lower() == ".csv":
            for column, why in _csv_value_changes(f).items():
                out.setdefault(column, why)
    return {("prompt" if c == prompt_column else c): why for c, why in out.items()}


def _json_type_changes(files: list[Path]) -> dict[str, str]:
    seen: dict[tuple[str, str], dict[str, tuple]] = {}  # (column, field) -> kind -> first (file, line, value)
    names: dict = {}
    for f in files:
        if f.suffix.lower() not in (".json", ".jsonl") or f.name in _DATASET_META:
            continue
        try:
            rows = _json_rows(f)
        except ValueError:
            continue  # not JSON: the loader's own check names the line
        for line, row in rows:
            for column, value in row.items():
                _collect(value, column, "", seen, (f, line), names)
    # a place holding mappings, lists or plain values, more than one of them: datasets stores it as JSON, and what
    # lies below it comes back as written
    stored = [(c, f) for (c, f), k in seen.items()
              if ("dict" in k) + ("list" in k) + bool(k.keys() & {"bool", "int", "float", "text"}) > 1]
    out = {}
    for (column, field), kinds in seen.items():
        if column not in out and not any(c == column and field != f and (not f or field.startswith((f + ".", f + "[")))
                                         for c, f in stored):
            why = _json_change(column, field, kinds)
            if why:
                out[column] = why
    return out


def _json_change(column: str, field: str, kinds: dict[str, tuple]) -> str | None:
    """Why the values at one place of a JSON column (``field``: ``""`` for the column's own values) would come
    back changed, from the kinds of value found there."""
    key = field.rstrip("[]").rsplit(".", 1)[-1] or column  # the key a value is written under
    name = f"dataset column {column!r}" + ("" if not field else " (its list's items)" if field == "[]" else
                                           f" (its field {field!r})")

    def where(kind):
        f, line, value = kinds[kind]
        return f"{value!r} in {f.name}" + (f" line {line}" if line else "")
    number = next((k for k in ("int", "float") if k in kinds), None)
    if "huge" in kinds:
        return (f"{name} holds an integer beyond 64 bits ({where('huge')}): datasets reads it as a float and loses "
                f"its last digits. Write it as text (\"{key}\": \"{kinds['huge'][2]}\")")
    if "int" in kinds and "float" in kinds and (not field or kinds.keys() <= {"int", "float"}):
        return (f"{name} holds whole numbers ({where('int')}) and fractional ones ({where('float')}): datasets reads "
                f"them all as floats, so {kinds['int'][2]!r} comes back as {float(kinds['int'][2])!r}, and a reward "
                f"comparing it as text scores it wrong. Write every value as text (\"{key}\": \"{kinds['int'][2]}\") "
                f"or every one with a decimal point")
    if not field and "text" in kinds and (number or "bool" in kinds):
        other = number or "bool"
        return (f"{name} holds text ({where('text')}) and {'numbers' if number else 'booleans'} ({where(other)}) "
                f"across the dataset's files: datasets types each file alone, then casts them to one type, so text "
                f"that looks like a number changes (\"007\" becomes 7). Give the column one type in every file: quote "
                f"every value as text, or write every value as a number")
    if not field and "bool" in kinds and number:
        return (f"{name} holds booleans ({where('bool')}) and numbers ({where(number)}): datasets casts one to the "
                f"other (true becomes 1, or 2 becomes true). Give the column one type in every row")
    if "decodes" in kinds and (number or "bool" in kinds or "dict" in kinds or "list" in kinds):
        f, line, text = kinds["decodes"]
        return (f"{name} holds text that reads as JSON ({where('decodes')}) beside "
                f"{'numbers' if number else 'booleans' if 'bool' in kinds else 'lists or mappings'}: datasets stores "
                f"such a place as JSON and decodes that text, so {text!r} comes back as {_decoded(text)!r}. Give it "
                f"one type everywhere: quote every value as text, or write every value as a number")
    return None  # elsewhere a place of several types is stored as JSON: its values come back as written


_JSON_START = frozenset('-0123456789[{"tfnNI')  # how text that reads as JSON starts (ujson: NaN, Infinity too)


def _decoded(text: str):
    """What datasets' JSON decoding makes of ``text`` (``"007"`` -> 7), or ``text`` where it reads as no JSON."""
    from datasets.utils.json import ujson_loads

    try:
        return ujson_loads(text)
    except (ValueError, TypeError, OverflowError):
        return text


_KINDS = {bool: "bool", int: "int", float: "float", str: "text"}


def _collect(value, column: str, field: str, seen: dict, where: tuple, names: dict | None = None) -> None:
    """Record the kinds of value at each place of ``value`` (through mappings, ``answer.value``, and lists,
    ``answer[]``): datasets gives every place one type, as it does a column. A list of plain values is recorded
    by one value of each type (and its first few texts), not item by item. Iterative, and each place's name is
    made once (``names``): a file of 200k nested rows is read in seconds."""
    names = {} if names is None else names
    todo = [(field, value)]
    while todo:
        field, value = todo.pop()
        kinds = seen.get((column, field))
        if kinds is None:
            kinds = seen[(column, field)] = {}
        kind = type(value)
        if kind is dict or kind is list:
            container = "dict" if kind is dict else "list"
            if container not in kinds:
                kinds[container] = (*where, "{...}" if kind is dict else "[...]")
            if kind is dict:
                for k, v in value.items():
                    name = names.get((field, k))
                    if name is None:
                        name = names[(field, k)] = f"{field}.{k}" if field else str(k)
                    todo.append((name, v))
                continue
            items = names.get((field, "[]"))
            if items is None:
                items = names[(field, "[]")] = f"{field}[]"
            by_type = {type(v): v for v in reversed(value)}  # the first value of each type
            if dict in by_type or list in by_type:
                todo.extend((items, v) for v in value)
                continue
            todo.extend((items, v) for v in by_type.values())
            places = seen.setdefault((column, items), {})
            if int in by_type and "huge" not in places:
                huge = next((v for v in value if type(v) is int and not -2**63 <= v < 2**63), None)
                if huge is not None:
                    places["huge"] = (*where, huge)
            if str in by_type:
                for v in value:
                    if "decodes" in places:
                        break
                    if type(v) is str:
                        _note_text(v, places, where)
            continue
        name = _KINDS.get(kind)  # NaN and Infinity too: beside them 1 comes back 1.0
        if name is None:
            continue
        if name not in kinds:
            kinds[name] = (*where, value)
        if name == "int" and not -2**63 <= value < 2**63 and "huge" not in kinds:
            kinds["huge"] = (*where, value)
        elif name == "text" and "decodes" not in kinds:
            _note_text(value, kinds, where)


def _note_text(text: str, kinds: dict, where: tuple) -> None:
    stripped = text.lstrip()
    if stripped and stripped[0] in _JSON_START:
        decoded = _decoded(text)
        if type(decoded) is not str or decoded != text:  # '"yes"' comes back 'yes'
            kinds["decodes"] = (*where, text)


def _parquet_type_changes(path: Path) -> dict[str, str]:
    """Columns whose type differs between the Parquet files of a folder: datasets casts them to the first file's
    type (an int64 column beside a string one: ``"007"`` becomes 7, or 7 becomes ``"7"``)."""
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*.parquet") if f.is_file())
    if len(files) < 2:
        return {}
    import pyarrow.parquet as pq

    first: dict[str, tuple[str, str]] = {}
    out = {}
    for f in files:
        try:
            schema = pq.read_schema(f)
        except Exception:  # the loader names an unreadable file
            continue
        for field in schema:
            kind = str(field.type)
            seen = first.setdefault(field.name, (f.name, kind))
            if seen[1] != kind and field.name not in out:
                out[field.name] = (f"dataset column {field.name!r} is {seen[1]} in {seen[0]} and {kind} in {f.name}: "
                                   f"datasets casts every file to one type, so values change (\"007\" becomes 7). "
                                   f"Write the column with one type in every file")
    return out


def _csv_value_changes(path: Path) -> dict[str, str]:
    import pandas as pd

    out: dict[str, str] = {}
    kwargs = dict(encoding="utf-8-sig", chunksize=10_000)  # datasets' CSV reader: pandas, 10,000 rows a chunk
    try:
        chunks = zip(pd.read_csv(path, **kwargs), pd.read_csv(path, dtype=str, keep_default_na=False, **kwargs))
        for parsed, text in chunks:
            for name in parsed.columns:
                if name in out:
                    continue
                column, cells = parsed[name], text[name].str.strip()
                kind = column.dtype.kind
                missing = column.isna() & (cells != "")
                if kind in "iu":
                    changed = cells != column.astype(str)
                elif kind == "f":  # a cell written as a whole number, read as a float
                    changed = column.notna() & ~cells.str.contains(r"[.eEnN]", regex=True)
                elif kind == "b":  # TRUE / false / True read as booleans: a reward comparing text sees True
                    changed = column.notna()
                else:
                    changed = missing & False
                if missing.any():
                    row = int(missing.idxmax())
                    out[name] = (f"dataset file {str(path)!r}: column {name!r}, data row {row + 1} holds "
                                 f"{text[name][row]!r}, which pandas reads as missing (NA, None, null, NaN and the like "
                                 f"count as no value): a reward would get None there. Use JSON Lines with the value "
                                 f"quoted as text (\"{name}\": \"{text[name][row]}\")")
                elif changed.any():
                    row = int(changed.idxmax())
                    value = column[row].item()
                    what = "the boolean" if kind == "b" else "the number"
                    out[name] = (f"dataset file {str(path)!r}: column {name!r}, data row {row + 1} holds "
                                 f"{text[name][row]!r}, which pandas reads as {what} {value!r} (it parses cells "
                                 f"that look like numbers or booleans"
                                 + ("; an empty cell makes the whole column floats" if column.isna().any() else "")
                                 + f"): a reward would see {value!r}. Use JSON Lines with the value quoted as text "
                                 f"(\"{name}\": \"{text[name][row]}\")")
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError):
        return out  # the loader's own checks name what is wrong with the file
    return out


_CHUNK = 1 << 20  # bytes read at a time when checking a text file's encoding


def unreadable_problem(path: Path) -> str | None:
    """The first text file of the dataset at ``path`` that is not UTF-8, or a CSV file whose rows do not match its
    header, or ``None``: checked before ``load_dataset``, which reads such bytes into the rows (pyarrow) or fills
    short rows with nulls (pandas) without a word."""
    for f in _text_files(path):
        problem = _decode_problem(f) or (_csv_problem(f) if f.suffix.lower() == ".csv" else None)
        if problem:
            return problem
    return None


def _text_files(path: Path) -> list[Path]:
    """The JSON Lines / JSON / CSV files of a dataset file or folder."""
    if path.is_file():
        return [path] if path.suffix.lower() in (".jsonl", ".json", ".csv") else []
    return sorted(f for f in path.rglob("*") if f.suffix.lower() in (".jsonl", ".json", ".csv") and f.is_file()
                  and not any(part.startswith(".") for part in f.relative_to(path).parts))


def _decode_problem(path: Path) -> str | None:
    """Where a text file stops being UTF-8 (line, column, byte), or ``None``; read in chunks."""
    import codecs

    with open(path, "rb") as fh:
        head = fh.read(4)
        for bom, name in ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
                          (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16")):  # UTF-32 LE's mark starts as UTF-16 LE's
            if head.startswith(bom):
                return (f"dataset file {str(path)!r} is {name} text (it starts with a {name} byte-order mark), not "
                        f"UTF-8: save it as UTF-8 (iconv -f {name} -t UTF-8 {path.name} > utf8-{path.name})")
        fh.seek(0)
        decoder = codecs.getincrementaldecoder("utf-8")()
        line, line_start, offset = 1, 0, 0
        while True:
            chunk = fh.read(_CHUNK)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                data = decoder.getstate()[0] + chunk  # bytes the decoder still held come first
                base = offset - len(decoder.getstate()[0])
                bad = err.start
                line += data.count(b"\n", 0, bad)
                last = data.rfind(b"\n", 0, bad)
                column = bad - last if last >= 0 else base + bad - line_start + 1
                return (f"dataset file {str(path)!r} is not UTF-8 text: line {line} has byte 0x{data[bad]:02x} at "
                        f"byte {column} of the line ({err.reason}). Save the file as UTF-8 (from Latin-1, for instance: "
                        f"iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name})")
            if not chunk:
                return None
            newlines = chunk.count(b"\n")
            if newlines:
                line += newlines
                line_start = offset + chunk.rfind(b"\n") + 1
            offset += len(chunk)


def _format_problem(path: Path, text: str) -> str | None:
    """The first line a JSON Lines, JSON or CSV file cannot be parsed at, or ``None``."""
    import json

    suffix = path.suffix.lower()
    if suffix == ".jsonl" or (suffix == ".json" and not text.lstrip().startswith("[")):
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            twice: list[str] = []
            try:
                row = json.loads(line, object_pairs_hook=lambda pairs: _note_repeated(pairs, twice))
            except json.JSONDecodeError as err:
                if suffix == ".json" and number == 1:
                    break  # one JSON document spread over lines: parsed whole below
                return f"dataset file {str(path)!r}: line {number} is not valid JSON ({err.msg} at column {err.colno})"
            if twice:
                return (f"dataset file {str(path)!r}: line {number} gives key(s) {twice} more than once (JSON keeps "
                        f"the last, the loader refuses the row): give each key once per line")
            if not isinstance(row, dict):
                return (f"dataset file {str(path)!r}: line {number} is a JSON {type(row).__name__}, not an object "
                        f"(one {{\"prompt\": ...}} object per line)")
        else:
            return None
    if suffix == ".json":
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            return f"dataset file {str(path)!r} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}"
    if suffix == ".csv":
        return _csv_problem(path)
    return None


def _note_repeated(pairs: list, twice: list[str]) -> dict:
    """``json.loads``' object hook: the object, with the keys given more than once noted in ``twice``."""
    keys = [k for k, _ in pairs]
    twice += [k for k in dict.fromkeys(keys) if keys.count(k) > 1 and k not in twice]
    return dict(pairs)


def _csv_problem(path: Path) -> str | None:
    """The first row of a CSV file with more or fewer fields than its header, named by the line it starts on (a
    quoted field may hold newlines), or ``None``. pandas refuses a longer row but fills a shorter one with nulls
    (a value left out in the middle moves the later ones a column left), without a word."""
    import csv

    with open(path, encoding="utf-8-sig", newline="") as fh:
        rows = csv.reader(fh)
        header = next(rows, [])
        twice = sorted({h for h in header if header.count(h) > 1})
        if twice:
            return (f"dataset file {str(path)!r}: the header names column(s) {twice} more than once (pandas would "
                    f"rename the second to '{twice[0]}.1', and a reward reading '{twice[0]}' gets the first only): give "
                    f"every column its own name")
        start = rows.line_num + 1
        for row in rows:
            if row and len(row) != len(header):
                return (f"dataset file {str(path)!r}: line {start} has {len(row)} fields, the header has "
                        f"{len(header)} ({', '.join(header)}); quote fields that hold commas, and give every row "
                        f"every field (an empty one as nothing between two commas)")
            start = rows.line_num + 1
    return None


def file_problem(path: Path, err: Exception) -> str:
    """What is wrong with the dataset at ``path`` that ``load_dataset`` failed to read (``err``), named by file,
    line and fix where the file shows it: not UTF-8, a line that is not JSON, a CSV row with other columns."""
    for f in _text_files(path):
        problem = _decode_problem(f) or _format_problem(f, f.read_text(encoding="utf-8"))
        if problem:
            return problem
    cause = err
    while cause.__cause__ is not None or cause.__context__ is not None:  # datasets wraps the reader's error
        cause = cause.__cause__ or cause.__context__
    where = f"dataset file {str(path)!r}" if path.is_file() else f"dataset folder {str(path)!r}"
    if not path.is_file() and "Unknown split" in str(cause):
        return (f"{where} has no train split: datasets splits a folder's files by their names (a name holding test, "
                f"eval or valid goes to that split, e.g. data_eval.jsonl), and none of its files is a train file "
                f"({type(cause).__name__}: {cause}). Point data.dataset at the file to train on")
    return f"{where} cannot be read: {type(cause).__name__}: {cause}"
