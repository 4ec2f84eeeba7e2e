"""llguidance vs xgrammar on the default model's tokenizer (vocab 49152): why pagedjax's
structured outputs use llguidance.

    pip install xgrammar        # not a pagedjax dependency (it pulls in torch and triton)
    python benchmarks/grammar_engines.py

For each engine and constraint (JSON schemas using nested objects, $ref, anyOf / oneOf,
formats, recursion, patternProperties, min/maxProperties, uniqueItems; a regex; an EBNF
grammar, and a Lark one for llguidance): the compile time and the per-step mask time over
a 64-step seeded random walk through the allowed tokens. Then coverage: for each schema, a
valid JSON text must be accepted and each invalid one (out of range, not in the enum,
too many items, bad pattern, bad format, not a multiple, duplicate items...) refused; a
keyword an engine cannot enforce must be an error, not silently ignored.
"""

from __future__ import annotations

import importlib.metadata
import json
import time

import numpy as np

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                 "minItems": 1, "maxItems": 3},
        "address": {"type": "object", "properties": {
            "city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["name", "age", "role", "tags", "address"], "additionalProperties": False},
    "refs_anyof": {
        "$defs": {"pt": {"type": "object", "properties": {"x": {"type": "number"},
                                                           "y": {"type": "number"}},
                         "required": ["x", "y"]}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/pt"},
                       "b": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/pt"}]},
                       "c": {"const": "fixed"}, "d": {"type": "boolean"}},
        "required": ["a", "b", "c", "d"]},
    "formats": {"type": "object", "properties": {
        "when": {"type": "string", "format": "date-time"},
        "email": {"type": "string", "format": "email"},
        "n": {"type": "number", "exclusiveMinimum": 0, "multipleOf": 0.5}},
        "required": ["when", "email"]},
    "oneof": {"oneOf": [
        {"type": "object", "properties": {"kind": {"const": "a"}, "v": {"type": "integer"}},
         "required": ["kind", "v"]},
        {"type": "object", "properties": {"kind": {"const": "b"}, "s": {"type": "string"}},
         "required": ["kind", "s"]}]},
    "recursive": {"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer"},
        "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
        "required": ["v"]}}, "$ref": "#/$defs/node"},
    "pattern_props": {"type": "object", "patternProperties": {"^x_": {"type": "integer"}},
                      "additionalProperties": False},
    "min_max_props": {"type": "object", "additionalProperties": {"type": "integer"},
                      "minProperties": 1, "maxProperties": 2},
    "unique": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
}
COVERAGE = {  # schema: (a valid text, texts that must be refused)
    "nested": ('{"name": "Al", "age": 30, "role": "user", "tags": ["a"], '
               '"address": {"city": "X", "zip": "12345"}}',
               ['{"name": "Al", "age": 130, "role": "user", "tags": ["a"], '
                '"address": {"city": "X", "zip": "12345"}}',
                '{"name": "Al", "age": 30, "role": "boss", "tags": ["a"], '
                '"address": {"city": "X", "zip": "12345"}}',
                '{"name": "Al", "age": 30, "role": "user", "tags": [], '
                '"address": {"city": "X", "zip": "12345"}}',
                '{"name": "Al", "age": 30, "role": "user", "tags": ["a", "b", "c", "d"], '
                '"address": {"city": "X", "zip": "12345"}}',
                '{"name": "Al", "age": 30, "role": "user", "tags": ["a"], '
                '"address": {"city": "X", "zip": "1234a"}}',
                '{"name": "Al", "age": 30.5, "role": "user", "tags": ["a"], '
                '"address": {"city": "X", "zip": "12345"}}']),
    "formats": ('{"when": "2024-01-02T03:04:05Z", "email": "a@b.com", "n": 1.5}',
                ['{"when": "yesterday", "email": "a@b.com"}',
                 '{"when": "2024-01-02T03:04:05Z", "email": "nope"}',
                 '{"when": "2024-01-02T03:04:05Z", "email": "a@b.com", "n": 0.7}']),
    "unique": ("[1, 2]", ["[1, 1]"]),
    "min_max_props": ('{"a": 1}', ["{}", '{"a": 1, "b": 2, "c": 3}']),
    "pattern_props": ('{"x_a": 1}', ['{"y": 1}']),
}
REGEX = r"(\d{3})-(\d{3})-(\d{4})"
LARK = 'start: expr\nexpr: term (("+" | "-") term)*\nterm: NUMBER | "(" expr ")"\nNUMBER: /[0-9]+/\n'
GBNF = ('root ::= expr\nexpr ::= term (("+" | "-") term)*\nterm ::= num | "(" expr ")"\n'
        'num ::= [0-9]+\n')
STEPS = 64


class LLGuidance:
    """llguidance: LLMatcher per grammar, masks into an int32 bitmask row."""

    name = "llguidance"

    def __init__(self, tokenizer, vocab, eos):
        import llguidance
        from llguidance.gbnf_to_lark import gbnf_to_lark

        self.llg, self.gbnf_to_lark = llguidance, gbnf_to_lark
        self.version = llguidance.__version__
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab,
                                                eos_token=[eos])

    def grammars(self):
        m = self.llg.LLMatcher
        for name, schema in SCHEMAS.items():
            yield name, lambda s=schema: m.grammar_from_json_schema(s)
        yield "regex", lambda: m.grammar_from_regex(REGEX)
        yield "lark", lambda: m.grammar_from_lark(LARK)
        yield "ebnf", lambda: m.grammar_from_lark(self.gbnf_to_lark(GBNF))

    def matcher(self, make):
        matcher = self.llg.LLMatcher(self.tokenizer, make(), log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error().split("\n")[0])
        return matcher

    def fill(self, matcher, mask):
        from llguidance.numpy import fill_next_token_bitmask
        fill_next_token_bitmask(matcher, mask, 0)

    def accepts(self, matcher, ids, eos):
        return matcher.consume_tokens(ids) and matcher.consume_token(eos)

    consume = staticmethod(lambda matcher, token: matcher.consume_token(token))


class XGrammar:
    """xgrammar: GrammarCompiler + GrammarMatcher, masks into its torch bitmask."""

    name = "xgrammar"

    def __init__(self, tokenizer, vocab, eos):
        import xgrammar

        self.xgr = xgrammar
        self.version = importlib.metadata.version("xgrammar")
        encoded = [tokenizer.backend.id_to_token(i) for i in range(vocab)]
        info = xgrammar.TokenizerInfo(encoded, xgrammar.VocabType.BYTE_LEVEL, vocab_size=vocab,
                                      stop_token_ids=[eos])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2)
        self.torch_mask = xgrammar.allocate_token_bitmask(1, vocab)

    def grammars(self):
        for name, schema in SCHEMAS.items():
            yield name, lambda s=schema: self.compiler.compile_json_schema(json.dumps(s))
        yield "regex", lambda: self.compiler.compile_regex(REGEX)
        yield "ebnf", lambda: self.compiler.compile_grammar(GBNF)

    def matcher(self, make):
        return self.xgr.GrammarMatcher(make())

    def fill(self, matcher, mask):
        matcher.fill_next_token_bitmask(self.torch_mask, 0)
        mask[:] = self.torch_mask.numpy()

    def accepts(self, matcher, ids, eos):
        return all(matcher.accept_token(t) for t in ids) and matcher.accept_token(eos)

    consume = staticmethod(lambda matcher, token: matcher.accept_token(token))


def random_walk(engine, matcher, vocab, eos, rng) -> list[float]:
    """Seconds of each mask over up to STEPS random allowed tokens (EOS never taken)."""
    mask = np.zeros((1, (vocab + 31) // 32), np.int32)
    times = []
    for _ in range(STEPS):
        start = time.perf_counter()
        engine.fill(matcher, mask)
        times.append(time.perf_counter() - start)
        allowed = np.flatnonzero(np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab])
        allowed = allowed[allowed != eos]
        if not len(allowed) or not engine.consume(matcher, int(rng.choice(allowed))):
            break
    return times


def main() -> None:
    """Measure both engines and print the comparison."""
    from gguf import GGUFReader

    from pagedjax.loading import default_gguf_path
    from pagedjax.loading.gguf_loader import read_metadata
    from pagedjax.loading.gguf_tokenizer import tokenizer_from_gguf

    tokenizer = tokenizer_from_gguf(read_metadata(GGUFReader(default_gguf_path())))
    vocab, eos = tokenizer.vocab_size, tokenizer.eos_token_id
    for engine_class in (LLGuidance, XGrammar):
        start = time.perf_counter()
        try:
            engine = engine_class(tokenizer, vocab, eos)
        except ImportError as error:
            print(f"{engine_class.name}: not installed ({error})")
            continue
        print(f"{engine.name} {engine.version}: tokenizer set up in "
              f"{time.perf_counter() - start:.2f}s")
        every = []
        makers = dict(engine.grammars())
        for name, make in makers.items():
            start = time.perf_counter()
            try:
                matcher = engine.matcher(make)
            except Exception as error:  # noqa: BLE001 - an unsupported constraint
                print(f"  {name:14} refused: {str(error)[:90]}")
                continue
            compile_ms = 1e3 * (time.perf_counter() - start)
            times = random_walk(engine, matcher, vocab, eos, np.random.default_rng(0))
            every += times
            print(f"  {name:14} compile {compile_ms:6.1f} ms, mask mean "
                  f"{1e6 * np.mean(times):5.0f} us, p99 {1e6 * np.percentile(times, 99):5.0f} "
                  f"us ({len(times)} steps)")
        print(f"  all masks: mean {1e6 * np.mean(every):.0f} us, median "
              f"{1e6 * np.median(every):.0f} us")
        for name, (valid, invalid) in COVERAGE.items():
            try:
                engine.matcher(makers[name])
            except Exception as error:  # noqa: BLE001
                print(f"  coverage {name:14} refused as unsupported: {str(error)[:60]}")
                continue
            ids = [tokenizer.encode(t, add_special_tokens=False) for t in [valid, *invalid]]
            ok = engine.accepts(engine.matcher(makers[name]), ids[0], eos)
            wrong = sum(bool(engine.accepts(engine.matcher(makers[name]), i, eos))
                        for i in ids[1:])
            print(f"  coverage {name:14} valid accepted: {ok}; invalid accepted: "
                  f"{wrong} of {len(invalid)}")


if __name__ == "__main__":
    main()
