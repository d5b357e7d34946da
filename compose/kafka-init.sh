#!/usr/bin/env bash
# kafka-init (docker-compose.yml): the bus's Kafka users and what each may do, set through the broker's LOCAL
# listener (loopback of the kafka container, whose network namespace this container shares). compose/README.md
# "Kafka principals and ACLs" explains the scheme; setting the same users and ACLs again changes nothing.
set -euo pipefail

BOOTSTRAP=127.0.0.1:9094
BIN=/opt/kafka/bin
TRAIN="$TOPIC_PREFIX.train.requests"
SAMPLE="$TOPIC_PREFIX.sample.requests"
REPLIES="$TOPIC_PREFIX.replies"
DEAD_LETTER="$TOPIC_PREFIX.dead-letter"

user() {  # NAME PASSWORD: a SCRAM-SHA-512 login (created, or its password replaced)
  "$BIN/kafka-configs.sh" --bootstrap-server "$BOOTSTRAP" --alter --entity-type users --entity-name "$1" \
    --add-config "SCRAM-SHA-512=[iterations=8192,password=$2]"
}

allow() {  # NAME OPERATION RESOURCE-ARGS...: one allow ACL for User:NAME
  local who="$1" operation="$2"
  shift 2
  "$BIN/kafka-acls.sh" --bootstrap-server "$BOOTSTRAP" --add --allow-principal "User:$who" \
    --operation "$operation" "$@" > /dev/null
}

topic() {  # TOPIC: the resource arguments of one topic
  printf '%s\n' --topic "$1" --resource-pattern-type literal
}

user gateway "$KAFKA_GATEWAY_PASSWORD"
user trainer "$KAFKA_TRAINER_PASSWORD"
user sampler "$KAFKA_SAMPLER_PASSWORD"
user metrics "$KAFKA_METRICS_PASSWORD"

# The parts create the bus's topics themselves (with their final partition counts) and read their metadata.
for part in gateway trainer sampler metrics; do
  allow "$part" Describe --topic "$TOPIC_PREFIX." --resource-pattern-type prefixed
done
for part in gateway trainer sampler; do
  allow "$part" Create --topic "$TOPIC_PREFIX." --resource-pattern-type prefixed
done

# gateway: publishes requests; its bus listener reads requests and replies (no consumer group).
for t in "$TRAIN" "$SAMPLE"; do allow gateway Write $(topic "$t"); done
for t in "$TRAIN" "$SAMPLE" "$REPLIES"; do allow gateway Read $(topic "$t"); done

# trainer / sampler: consume their request topic in their group, answer on the reply topic, park poison.
allow trainer Read $(topic "$TRAIN")
allow trainer Read --group "$TRAINER_GROUP" --resource-pattern-type literal
allow sampler Read $(topic "$SAMPLE")
allow sampler Read --group "$SAMPLER_GROUP" --resource-pattern-type literal
for part in trainer sampler; do
  for t in "$REPLIES" "$DEAD_LETTER"; do allow "$part" Write $(topic "$t"); done
done

# metrics: reads the log to draw the dashboard's curves (no consumer group).
for t in "$TRAIN" "$SAMPLE" "$REPLIES"; do allow metrics Read $(topic "$t"); done

# Direct producers: User:tenant-<TENANT> may write requests and nothing else. It reads no reply (results come
# from the gateway's retrieve_future with the tenant's API key), and what it writes counts as <TENANT>'s only when
# signed with that tenant's event key (TINKER_BUS_EVENT_KEYS), which the workers check.
IFS=',' read -r -a tenants <<< "${KAFKA_TENANT_USERS:-}"
for entry in "${tenants[@]}"; do
  [ -n "${entry// /}" ] || continue
  name="${entry%%=*}"
  password="${entry#*=}"
  if [ -z "$name" ] || [ "$name" = "$entry" ] || [ -z "$password" ]; then
    echo "KAFKA_TENANT_USERS entry '${name}' is not TENANT=PASSWORD" >&2
    exit 1
  fi
  user "tenant-$name" "$password"
  for t in "$TRAIN" "$SAMPLE"; do allow "tenant-$name" Write $(topic "$t"); done
done

echo "kafka-init: users gateway, trainer, sampler, metrics and ${#tenants[@]} tenant producer(s) set"
