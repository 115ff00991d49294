"""Benchmarks and the load generator: what homenet costs, each measured against a floor in the same run.

Apart from the product so that `configurator/` holds only the configurator; installed with it
(`homenet.bench`) so that `homenet bench …` works from a gateway install.

  onboard       `homenet bench onboard` (onboard.py): one new device at a time, from its CONNACK
                to the gateway's `config.applied`. Floor: the same wire exchange with canned
                payloads and a responder that does no work, on the same broker.
  storm         `homenet bench storm` (storm.py, devices from loadgen.py): N new devices at once
                after a power cut; time until all are confirmed, CPU and peak RSS. The embedded
                gateway (amqtt, `homenet gateway run`) against Mosquitto + `configurator run`,
                side by side with the ratio.
  soak          soak.py (`make soak`): devices join, leave, flap and stall while the broker and
                the configurator restart; then the invariants. Floor: none, it is a reliability
                check (every invariant holds, and how long convergence took).
  day0          day0.py (`make bench-day0`, root): link-up to usable IPv4 for a new device.
                Floor: dnsmasq + busybox udhcpc on the same namespaces.
  cloud         `homenet bench cloud` (cloud.py): simulated homes onboarding devices against
                `homenet cloud run` on PostgreSQL, one and two server processes side by side.
                Floor: one process (the ratio says what the second buys).
  agent_memory  agent_memory.py: the agent's resident memory layer by layer as its libraries
                load. Floor: the bare interpreter (the first line).
"""
