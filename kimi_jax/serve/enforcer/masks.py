"""Token masks: the trie walk with the automaton (`_walk`), the numpy shortcut inside a free string
(`_free_string`), the per-grammar, per-vocabulary mask cache and allowed_tokens."""

from __future__ import annotations

import bisect
import collections
import threading
import weakref

import numpy as np

from .config import ATOMS
from .grammar import ToolCallGrammar
from .schema import _Str
from .vocab import _VOCABS_LOCK, CLOSES, OPENS_CHAR, PLAIN, VocabIndex


def _walk(grammar: ToolCallGrammar, stack: tuple, toks: list[bytes], ids: np.ndarray, group_end: list[int],
          out: np.ndarray) -> None:
    """Set out[id] for each token of the sorted `toks` whose bytes keep `stack` alive: a depth-first walk of
    the implicit trie (one state per depth of the current prefix). A dead first byte skips its group
    (group_end[b]: index of the first token after those starting with byte b); a deeper dead prefix skips its
    subtree by bisection."""
    feed, n, i = grammar.feed_byte, len(toks), 0
    while i < n:
        b0 = toks[i][0]
        first = feed(stack, b0)
        end = group_end[b0]
        if first is None:
            i = end
            continue
        states, prev = [stack, first], toks[i][:1]
        while i < end:
            tok = toks[i]
            common, limit = 1, min(len(prev), len(tok), len(states) - 1)
            while common < limit and prev[common] == tok[common]:
                common += 1
            del states[common + 1:]
            dead_at = -1
            for depth in range(common, len(tok)):
                nxt = feed(states[depth], tok[depth])
                if nxt is None:
                    dead_at = depth
                    break
                states.append(nxt)
            if dead_at < 0:
                out[ids[i]] = True
                prev = tok
                i += 1
            else:
                after = _successor(tok[:dead_at + 1])
                i = end if after is None else bisect.bisect_left(toks, after, i + 1, end)
                prev = tok[:dead_at]
        i = end


def _successor(prefix: bytes) -> bytes | None:
    """The least byte string above every string that starts with `prefix` (None: there is none)."""
    prefix = prefix.rstrip(b"\xff")
    return prefix[:-1] + bytes((prefix[-1] + 1,)) if prefix else None


class _LRU:
    def __init__(self, size: int):
        self.size, self.data, self.lock = size, collections.OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            value = self.data.get(key)
            if value is not None:
                self.data.move_to_end(key)
            return value

    def put(self, key, value):
        with self.lock:
            self.data[key] = value
            if len(self.data) > self.size:
                self.data.popitem(last=False)


_MASK_CACHES: "weakref.WeakKeyDictionary[ToolCallGrammar, weakref.WeakKeyDictionary]" = weakref.WeakKeyDictionary()


def _mask_cache(grammar: ToolCallGrammar, vocab: VocabIndex) -> _LRU:
    with _VOCABS_LOCK:
        per_vocab = _MASK_CACHES.setdefault(grammar, weakref.WeakKeyDictionary())
        cache = per_vocab.get(vocab)
        if cache is None:
            cache = per_vocab[vocab] = _LRU(max(64, min(4096, (1 << 26) // vocab.vocab_size)))
        return cache


def _free_string(grammar: ToolCallGrammar, vocab: VocabIndex, stack: tuple, out: np.ndarray) -> None:
    """Mask of the ordinary tokens inside a string without pattern, no character pending: decided with numpy
    from each token's plain prefix and kind (`_split_plain`) against the room left, the characters still
    required and the '<' just written; only the distinct tails after a closing quote (walked from the state
    after the string) and the tokens holding a backslash go through the automaton. A string that keeps its text
    (an item of a uniqueItems array) takes the tokens that leave room for one more character at once (over a
    million completions, a handful of earlier items to avoid) and runs the others through the automaton (those
    that fill the string one by one, those that close or escape it by a trie walk)."""
    _, nid, _, n, d, _, value, seen = stack[-1]
    node: _Str = grammar.nodes[nid]
    room, chars, kind = node.max_len - n, vocab.prefix_chars, vocab.kind
    ok = chars <= room
    if node.dfa.lt[d]:
        ok &= ~vocab.pipe_first
    if value is not None:
        out |= ok & ((kind == PLAIN) & (chars >= 1) & (chars < room) | (kind == OPENS_CHAR) & (chars + 1 < room))
        # a plain token that fills the string must be followed by its closing quote: allowed iff the string is
        # long enough and not an earlier item
        if n + room >= node.min_len:
            out |= ok & (kind == PLAIN) & (chars >= 1) & (chars == room)
            for f in seen:
                if len(f) == node.max_len and f.startswith(value):
                    i = vocab.id_of.get(f[n:].encode("utf-8"))
                    if i is not None and kind[i] == PLAIN:
                        out[i] = False
        for i in np.flatnonzero(ok & (kind == OPENS_CHAR) & (chars + 1 == room)):
            out[i] = grammar.feed_bytes(stack, vocab.bytes_of[int(i)]) is not None
        _walk(grammar, stack, vocab.quote_toks, vocab.quote_ids, vocab.quote_group_end, out)
        return
    tail_ok = np.zeros(len(vocab.tails) + 1, bool)                  # last entry: nothing after the quote
    tail_ok[-1] = True
    _walk(grammar, grammar._pop(stack, None), vocab.tails, vocab.tail_ids, vocab.tail_group_end, tail_ok)
    out |= ok & ((kind == PLAIN) & (chars >= 1)
                 | (kind == OPENS_CHAR) & (chars + 1 <= room)
                 | (kind == CLOSES) & (n + chars >= node.min_len) & tail_ok[vocab.tail_of])
    _walk(grammar, stack, vocab.escape_toks, vocab.escape_ids, vocab.escape_group_end, out)


def _mask_key(grammar: ToolCallGrammar, vocab: VocabIndex, stack: tuple) -> tuple:
    """The cache key of a state's mask: the state itself, except inside a string without pattern that keeps no
    text, whose mask depends on its length n only through the room left and the characters still
    required, each as far as one token reaches (clamped to vocab.max_len + 1), and on a pending UTF-8
    character only through the bytes it still needs (any character is allowed there)."""
    top = stack[-1]
    if top[0] != "T" or top[2] == 0 or top[6] is not None:
        return stack
    _, nid, phase, n, d, pend, _, _ = top
    node = grammar.nodes[nid]
    if not node.dfa.free:
        return stack
    reach = vocab.max_len + 1
    norm = ("T*", nid, phase, min(node.max_len - n, reach), max(0, min(node.min_len - n, reach)), node.dfa.lt[d],
            None if pend is None else pend[1:])
    return stack[:-1] + (norm,)


def allowed_tokens(grammar: ToolCallGrammar, vocab: VocabIndex, stack: tuple, *, use_cache: bool = True,
                   fast: bool = True) -> np.ndarray:
    """bool [vocab_size]: the tokens that keep `stack` alive (read-only when cached). fast=False walks every
    token (no plain-string shortcut), for tests."""
    cache = _mask_cache(grammar, vocab) if use_cache else None
    key = _mask_key(grammar, vocab, stack)
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            return hit
    out = np.zeros(vocab.vocab_size, bool)
    for name, i in vocab.atoms.items():
        if name in ATOMS and grammar.feed_atom(stack, name) is not None:
            out[i] = True
    top = stack[-1]
    if fast and top[0] == "T" and top[2] == 1 and grammar.nodes[top[1]].dfa.free:
        _free_string(grammar, vocab, stack, out)
    else:
        _walk(grammar, stack, vocab.toks, vocab.ids, vocab.group_end, out)
    if cache is not None:
        out.setflags(write=False)
        cache.put(key, out)
    return out
