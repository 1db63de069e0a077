import json, sys, time, psutil
out = open(sys.argv[1], "a")
end = time.time() + float(sys.argv[2])
while time.time() < end:
    rows = {}
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if "distill.cli serve" in cmd or "VLLM" in cmd or "EngineCore" in cmd or p.name().startswith("VLLM"):
                rows[f"{p.pid}:{p.name()}:{cmd[:40]}"] = p.memory_full_info().pss // 2**20
        except Exception:
            pass
    out.write(json.dumps({"t": time.time(), "pss_mib": rows}) + "\n"); out.flush()
    time.sleep(30)
