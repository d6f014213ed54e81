{{/* Names and labels. */}}
{{- define "herald.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "herald.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "herald.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "herald.labels" -}}
helm.sh/chart: {{ include "herald.chart" . }}
app.kubernetes.io/name: {{ include "herald.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: herald
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "ingress"). */}}
{{- define "herald.selectorLabels" -}}
app.kubernetes.io/name: {{ include "herald.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "herald.componentLabels" -}}
{{ include "herald.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "herald.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "herald.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "herald.fullname" .)) .Values.tls.secretName }}
{{- end }}

{{- define "herald.natsName" -}}
{{- printf "%s-nats" (include "herald.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "herald.natsUrl" -}}
{{- if .Values.nats.enabled }}
{{- printf "nats://%s.%s.svc:4222" (include "herald.natsName" .) .Release.Namespace }}
{{- else }}
{{- .Values.nats.url }}
{{- end }}
{{- end }}

{{- define "herald.watchNamespace" -}}
{{- default .Release.Namespace .Values.watchNamespace }}
{{- end }}

{{/* The herald.yaml every role reads (each its own section). */}}
{{- define "herald.config" -}}
{{- $v := .Values }}
{{- $listen := $v.ingress.listenAddress }}
{{- $listeners := list }}
{{- $tlsModes := dict "submission" "starttls" "submissions" "implicit" "smtp" "starttls" "bounces" "starttls" }}
{{- if and $v.ingress.ports.smtp.enabled $v.ingress.ports.bounces.enabled (eq (int $v.ingress.ports.smtp.port) (int $v.ingress.ports.bounces.port)) }}
{{- fail "ingress.ports.smtp and ingress.ports.bounces cannot share a port: bounces take no AUTH" }}
{{- end }}
{{- range $name := list "submission" "submissions" "smtp" "bounces" }}
{{- $p := index $v.ingress.ports $name }}
{{- if $p.enabled }}
{{- $addr := printf "%s:%d" $listen (int $p.containerPort) }}
{{- if contains ":" $listen }}
{{- $addr = printf "[%s]:%d" $listen (int $p.containerPort) }}
{{- end }}
{{- $listener := dict "name" $name "addr" $addr "tls" (index $tlsModes $name) "allow_plaintext_auth" $v.ingress.allowPlaintextAuth }}
{{- if eq $name "bounces" }}
{{- $_ := set $listener "inbound" true }}
{{- $_ := set $listener "allow_plaintext_auth" false }}
{{- end }}
{{- $listeners = append $listeners $listener }}
{{- end }}
{{- end }}
{{- $nats := dict "url" (include "herald.natsUrl" .) "replicas" (int $v.nats.replicas) "queue_lifetime" $v.nats.queueLifetime "duplicate_window" $v.nats.duplicateWindow "events_retention" $v.nats.eventsRetention "publish_timeout" $v.nats.publishTimeout }}
{{- if $v.nats.credentials.secretName }}
{{- $_ := set $nats "credentials" (printf "/etc/herald/nats/%s" $v.nats.credentials.key) }}
{{- end }}
{{- $ingress := dict "hostname" $v.hostname "tls" (dict "cert" "/etc/herald/tls/tls.crt" "key" "/etc/herald/tls/tls.key") "listeners" $listeners "max_message_size" (int64 $v.ingress.maxMessageSize) "max_recipients" (int $v.ingress.maxRecipients) "max_connections" (int $v.ingress.maxConnections) "max_connections_per_ip" (int $v.ingress.maxConnectionsPerIp) "drain_timeout" (printf "%ds" (int $v.ingress.drainTimeoutSeconds)) }}
{{- $delivery := dict "hostname" (default $v.hostname $v.delivery.hostname) "dns" (dict "nameservers" $v.dns.nameservers "timeout" $v.dns.timeout) "smtp_port" (int $v.delivery.smtpPort) "concurrency" (int $v.delivery.concurrency) "require_tls" $v.delivery.requireTls "retry" (dict "initial" $v.delivery.retry.initial "max" $v.delivery.retry.max) "ack_wait" $v.delivery.ackWait }}
{{- if $v.delivery.relayHost }}
{{- $_ := set $delivery "relay_host" $v.delivery.relayHost }}
{{- end }}
{{- with $v.delivery.egress.sources }}
{{- $_ := set $delivery "sources" . }}
{{- end }}
{{- with $v.delivery.egress.pools }}
{{- $_ := set $delivery "pools" . }}
{{- end }}
{{- with $v.delivery.egress.defaultPool }}
{{- $_ := set $delivery "default_pool" . }}
{{- end }}
{{- with $v.delivery.egress.warmupSchedule }}
{{- $_ := set $delivery "warmup" (dict "schedule" .) }}
{{- end }}
{{- with $v.delivery.egress.shaping }}
{{- $_ := set $delivery "shaping" . }}
{{- end }}
{{- $config := dict "nats" $nats "resources" (dict "source" "kubernetes" "namespace" (include "herald.watchNamespace" .)) "ingress" $ingress "delivery" $delivery "admin" (dict "addr" (printf "0.0.0.0:%d" (int $v.admin.port))) }}
{{- $config = mustMergeOverwrite $config (deepCopy $v.config) }}
{{- toYaml $config }}
{{- end }}

{{/* Environment of every Herald container: (dict "ctx" $ "component" "ingress" "env" list). */}}
{{- define "herald.env" -}}
{{- $v := .ctx.Values -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: RUST_LOG
  value: {{ $v.logLevel | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ printf "herald-%s" .component | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ trimSuffix "," (printf "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE),service.instance.id=$(POD_NAME),%s" $v.otel.resourceAttributes) | quote }}
{{- if $v.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $v.otel.endpoint | quote }}
{{- end }}
{{- if $v.otel.sampler }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $v.otel.sampler | quote }}
{{- end }}
{{- if $v.otel.samplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $v.otel.samplerArg | quote }}
{{- end }}
{{- if and $v.bounces.secretName (has .component (list "ingress" "delivery")) }}
- name: HERALD_BOUNCES__SECRET
  valueFrom:
    secretKeyRef:
      name: {{ $v.bounces.secretName }}
      key: {{ $v.bounces.secretKey }}
{{- end }}
{{- with .env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Pod-level security context of Herald pods. */}}
{{- define "herald.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container-level security context of every container of the chart. */}}
{{- define "herald.containerSecurityContext" -}}
runAsNonRoot: true
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "herald.prometheusAnnotations" -}}
{{- if .Values.admin.prometheusAnnotations -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.admin.port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}
