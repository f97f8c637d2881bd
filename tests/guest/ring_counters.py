# Defines _counts() in the REPL: context switches of the REPL's threads so
# far and the guest's interrupts. This guest kernel keeps no per-task count
# of system calls; each one that blocks is a switch. Used by
# tests/vmm_ring.rs and the bench's ring section.
import os


def _counts():
    switches = 0
    for t in os.listdir('/proc/self/task'):
        for line in open('/proc/self/task/%s/status' % t):
            if 'ctxt_switches' in line:
                switches += int(line.split()[-1])
    irq = 0
    for line in open('/proc/interrupts'):
        p = line.split()
        if p and p[0].endswith(':'):
            irq += sum(int(x) for x in p[1:] if x.isdigit())
    return switches, irq
