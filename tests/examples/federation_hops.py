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
    a_fl=nxt(A,a_in,'flushed',t1)
    a_off=nxt(A,a_in,'swarm: send request',t1)
    c_req=nxt(C,a_off,'swarm: request in',t1) if a_off else None
    c_fl=nxt(C,c_req,'flushed',t1) if c_req else None
    c_resp=nxt(C,c_req,'swarm: send response',t1) if c_req else None
    a_acc=nxt(A,a_off,'swarm: response in',t1) if a_off else None
    c_res=nxt(C,c_resp,'mqtt in op=result',t1) if c_resp else None
    c_fl2=nxt(C,c_res,'flushed',t1) if c_res else None
    c_send=nxt(C,c_res,'swarm: send request',t1) if c_res else None
    a_req=nxt(A,c_send,'swarm: request in',t1) if c_send else None
    a_fl2=nxt(A,a_req,'flushed',t1) if a_req else None
    a_not=nxt(A,a_req,'notify',t1) if a_req else None
    pts=[('client->A mqtt in',t0,a_in),('A submit..flush done',a_in,a_fl),('A flush..offer swarm send',a_fl,a_off),
      ('offer transit A->C swarm',a_off,c_req),('C req in..flush done',c_req,c_fl),('C flush..resp swarm send',c_fl,c_resp),
      ('accept transit C->A',c_resp,a_acc),('C resp..mqtt result in (agent hop)',c_resp,c_res),('C result..flush done',c_res,c_fl2),
      ('C flush..swarm send',c_fl2,c_send),('result transit C->A swarm',c_send,a_req),('A req in..flush done',a_req,a_fl2),
      ('A flush..notify',a_fl2,a_not),('A notify->client',a_not,t1),('total',t0,t1)]
    for k,a,b in pts:
        if a is not None and b is not None: add(k,b-a)
for k,v in segs.items():
    print('%-40s n=%4d p50=%6d us  mean=%6d'%(k,len(v),statistics.median(v),statistics.mean(v)))
