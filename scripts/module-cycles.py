#!/usr/bin/env python3
"""Lists pairs of Rust modules that import each other (a `use` each way, a
parent's `pub use child::X` plus the child's `use super::Y` included); exits 1
if there is any. Usage: scripts/module-cycles.py shim/src vmm/src agent/src ..."""
import os, re, sys
def modules(src):
    mods = {}
    for dp, dn, fn in os.walk(src):
        for f in fn:
            if not f.endswith('.rs'): continue
            p = os.path.join(dp, f)
            rel = os.path.relpath(p, src)[:-3].split(os.sep)
            if rel[-1] in ('mod', 'lib', 'main'): rel = rel[:-1]
            mods[tuple(rel)] = p
    return mods
def resolve(path, mods):
    # longest prefix that is a module
    for i in range(len(path), -1, -1):
        if tuple(path[:i]) in mods: return tuple(path[:i])
    return ()
def imports(mod, p, mods):
    text = open(p).read()
    text = re.sub(r'#\[cfg\(test\)\]\s*mod tests \{.*', '', text, flags=re.S)
    out = set()
    for m in re.finditer(r'\buse\s+([^;]+);', text):
        u = m.group(1).replace(' ', '').replace('\n', '')
        heads = []
        # expand braces one level
        mm = re.match(r'^([\w:]+)::\{(.*)\}$', u, re.S)
        if mm:
            base = mm.group(1)
            for part in re.split(r',(?![^{]*\})', mm.group(2)):
                heads.append(base + '::' + part.split('{')[0].rstrip(':'))
        else:
            heads.append(u)
        for h in heads:
            segs = [s for s in h.split('::') if s]
            if not segs: continue
            if segs[0] == 'crate': path = segs[1:]
            elif segs[0] == 'super':
                base = list(mod); i = 0
                while i < len(segs) and segs[i] == 'super':
                    base = base[:-1]; i += 1
                path = base + segs[i:]
            elif segs[0] == 'self': path = list(mod) + segs[1:]
            elif tuple(list(mod) + [segs[0]]) in mods: path = list(mod) + segs
            else: continue
            r = resolve(path, mods)
            if r != mod: out.add(r)
    return out
bad = 0
for src in sys.argv[1:]:
    mods = modules(src)
    g = {m: imports(m, p, mods) for m, p in mods.items()}
    for a in g:
        for b in g[a]:
            if a < b and a in g.get(b, ()):
                print(f"{src}: {'::'.join(a) or 'crate'} <-> {'::'.join(b) or 'crate'}"); bad += 1
print("cycles:", bad)
sys.exit(1 if bad else 0)
