#!/usr/bin/env python3
"""Fails if two modules of src/ depend on each other, directly or through others.

A module is a top-level module of the crate (`src/x.rs` or `src/x/`) or, inside one, a
submodule (`src/x/y.rs`); an edge is any `crate::a::b` path or `use super::...` in its
non-test code. Run by .ci/run; prints the cycle it finds."""
import os, re, sys

root = os.path.join(os.path.dirname(__file__), '..', 'src')

def module_of(path):
    rel = os.path.relpath(path, root)[:-3].split(os.sep)
    if rel[-1] == 'mod':
        rel = rel[:-1]
    return '::'.join(rel) if rel[0] not in ('lib', 'main') else None

def strip_tests(text):
    # Drop `#[cfg(test)] mod ... { ... }` blocks (brace-matched).
    out, i = [], 0
    for m in re.finditer(r'#\[cfg\(test\)\]\s*mod\s+\w+\s*\{', text):
        if m.start() < i:
            continue
        out.append(text[i:m.start()])
        depth, j = 1, m.end()
        while depth and j < len(text):
            depth += {'{': 1, '}': -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return ''.join(out)

modules = {}
for dirpath, _, files in os.walk(root):
    for f in files:
        if f.endswith('.rs'):
            p = os.path.join(dirpath, f)
            m = module_of(p)
            if m:
                modules[m] = strip_tests(open(p).read())

def resolve(mod, path):
    """The module a `crate::...` or `super::...` path names, as the longest known prefix."""
    parts = path.split('::')
    if parts[0] == 'super':
        base = mod.split('::')[:-1]
        parts = base + parts[1:]
    elif parts[0] == 'crate':
        parts = parts[1:]
    else:
        return None
    for n in range(len(parts), 0, -1):
        cand = '::'.join(parts[:n])
        if cand in modules:
            return cand
    return None

edges = {m: set() for m in modules}
for m, text in modules.items():
    text = re.sub(r'//.*', '', text)
    for path in re.findall(r'\b((?:crate|super)(?:::\w+)+)', text):
        t = resolve(m, path)
        # A module may use its own children and its parent's items: only edges between
        # modules that are not one inside the other count.
        if t and t != m and not t.startswith(m + '::') and not m.startswith(t + '::'):
            edges[m].add(t)
    for group in re.findall(r'\buse\s+(crate|super)::\{([^;]*)\}', text):
        for item in re.split(r',\s*', group[1]):
            item = item.strip().split('::')[0].split(' ')[0]
            if item and item != 'self':
                t = resolve(m, group[0] + '::' + item)
                if t and t != m and not t.startswith(m + '::') and not m.startswith(t + '::'):
                    edges[m].add(t)

def top(m):
    return m.split('::')[0]

# Cycles between top-level modules, and between siblings inside one.
graph = {}
for m, ts in edges.items():
    for t in ts:
        a, b = (top(m), top(t)) if top(m) != top(t) else (m, t)
        if a != b:
            graph.setdefault(a, set()).add(b)

# Strongly connected components (Tarjan): each with more than one module is a cycle.
index, low, on, stack, sccs = {}, {}, set(), [], []
def strong(n):
    index[n] = low[n] = len(index)
    stack.append(n)
    on.add(n)
    for t in graph.get(n, ()):
        if t not in index:
            strong(t)
            low[n] = min(low[n], low[t])
        elif t in on:
            low[n] = min(low[n], index[t])
    if low[n] == index[n]:
        comp = []
        while True:
            t = stack.pop()
            on.discard(t)
            comp.append(t)
            if t == n:
                break
        if len(comp) > 1:
            sccs.append(sorted(comp))

for n in sorted(graph):
    if n not in index:
        strong(n)
for comp in sccs:
    print('modules that depend on one another: ' + ', '.join(comp))
    for a in comp:
        print(f'  {a} -> ' + ', '.join(sorted(t for t in graph[a] if t in comp)))
if sccs:
    sys.exit(1)
print(f'no module cycle among {len(modules)} modules')
