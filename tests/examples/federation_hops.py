#!/usr/bin/env python3
"""Per-hop medians from the logs of tests/examples/federation_hops.rs: python3 federation_hops.py /tmp/hops"""
import re,sys,statistics,datetime
ansi=re.compile(r'\x1b\[[0-9;]*m')
def load(p):
    ev=[]
    for l in open(p):
        l=ansi.sub('',l)
        if 'fedmesh_hop' not in l: continue
        ts=l.split()[0]
        dt=datetime.datetime.strptime(ts[:26],'%Y-%m-%dT%H:%M:%S.%f').replace(tzinfo=datetime.timezone.utc)
        us=int(dt.timestamp()*1e6)
        msg=l.split('fedmesh_hop:')[1].strip()
        ev.append((us,msg))
    return ev
d=sys.argv[1]
A=load(d+'/a.log'); C=load(d+'/c.log')
cl=[l.split() for l in open(d+'/client.log')]
def nxt(ev,start,pat,end=None):
    for t,m in ev:
        if t>=start and (end is None or t<=end) and m.startswith(pat): return t
    return None
segs={}
def add(k,v):
    if v is not None: segs.setdefault(k,[]).append(v)
for task,t0,t1,tot in cl:
    t0=int(t0);t1=int(t1)
    a_in=nxt(A,t0-2000,'mqtt in op=submit',t1)
    if a_in is None: continue
    a_off=nxt(A,a_in,'swarm: send request',t1)
    c_req=nxt(C,a_off,'swarm: request in',t1) if a_off else None
    c_fl=nxt(C,c_req,'flushed',t1) if c_req else None
    c_resp=nxt(C,c_req,'swarm: send response',t1) if c_req else None
    c_dlv=nxt(C,c_req,'deliver hosted',t1) if c_req else None
    a_acc=nxt(A,a_off,'swarm: response in',t1) if a_off else None
    c_res=nxt(C,c_dlv,'mqtt in op=result',t1) if c_dlv else None
    c_send=nxt(C,c_res,'swarm: send request',t1) if c_res else None
    a_req=nxt(A,c_send,'swarm: request in',t1) if c_send else None
    a_fl2=nxt(A,a_req,'flushed',t1) if a_req else None
    a_not=nxt(A,a_req,'notify',t1) if a_req else None
    # The critical path, in order; the off-path legs (C's accept flush and answer) after it.
    pts=[('1 client -> A: MQTT submit in',t0,a_in),('2 A: submit -> offer handed to swarm',a_in,a_off),
      ('3 offer transit A swarm -> C swarm',a_off,c_req),('4 C: offer in -> delivered to agent',c_req,c_dlv),
      ('5 C -> agent -> C: MQTT round trip',c_dlv,c_res),('6 C: result in -> handed to swarm',c_res,c_send),
      ('7 result transit C swarm -> A swarm',c_send,a_req),('8 A: result in -> result published (held at the proxy until the flush)',a_req,a_not),
      ('9 A: result in -> flushed',a_req,a_fl2),('10 A: flushed -> client has the result',a_fl2,t1),('total',t0,t1),
      ('(off path) C: offer in -> flushed',c_req,c_fl),('(off path) C: flushed -> Accept to swarm',c_fl,c_resp),
      ('(off path) Accept transit C -> A',c_resp,a_acc)]
    for k,a,b in pts:
        if a is not None and b is not None: add(k,b-a)
for k,v in sorted(segs.items(), key=lambda kv: (kv[0][0]=='(', int(kv[0].split()[0]) if kv[0][0].isdigit() else 99)):
    print('%-40s n=%4d p50=%6d us  mean=%6d'%(k,len(v),statistics.median(v),statistics.mean(v)))
