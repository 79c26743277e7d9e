"""Rewrites candle-core's backprop.rs: `let s = grads.or_insert(a)?; ... *s = s.add(e)?` becomes
`... grads.accumulate(a, e)?` wherever nothing in between (and not `e`) reads the slot `s`,
and adds `GradStore::accumulate`. See PATCHED.md."""
import re, sys
p = sys.argv[1]
lines = open(p).read().split('\n')
out = []; i = 0; n = 0
ins = re.compile(r'^(\s*)let (\w+) = grads\.or_insert\((\w+)\)\?;$')
while i < len(lines):
    m = ins.match(lines[i])
    if m:
        ind, var, arg = m.groups()
        addre = re.compile(r'^(\s*)\*' + var + r' = ' + var + r'\.add\((.+)\)\?(;?)$')
        j = i + 1; ok = False
        while j < len(lines):
            am = addre.match(lines[j])
            if am:
                ok = var not in am.group(2)
                break
            l = lines[j]
            if re.search(r'\b' + var + r'\b', l) or (l.strip() and len(l) - len(l.lstrip()) < len(ind)):
                break
            j += 1
        if ok:
            am = addre.match(lines[j])
            out.extend(lines[i + 1:j])
            out.append(f'{am.group(1)}grads.accumulate({arg}, {am.group(2)})?{am.group(3)}')
            n += 1; i = j + 1; continue
    out.append(lines[i]); i += 1
s = '\n'.join(out)
anchor = '    /// Extend this gradient store'
assert anchor in s
s = s.replace(anchor, '''    /// Adds `grad` into the gradient of `tensor`. The first gradient reaching a tensor is stored
    /// as it is (made contiguous) instead of being added into a fresh tensor of zeros, as
    /// `or_insert` followed by `add` does: one allocation, fill and pass fewer per tensor.
    fn accumulate(&mut self, tensor: &Tensor, grad: &Tensor) -> Result<()> {
        match self.0.entry(tensor.id()) {
            Entry::Occupied(mut entry) => {
                let sum = entry.get().add(grad)?;
                entry.insert(sum);
            }
            Entry::Vacant(entry) => {
                entry.insert(grad.contiguous()?);
            }
        }
        Ok(())
    }

''' + anchor, 1)
open(p, 'w').write(s)
print("converted", n, "or_insert left", s.count('grads.or_insert('))
